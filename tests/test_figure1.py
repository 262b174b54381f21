"""The paper's Figure 1 (one image and class, one model per target resolution N, each map at
its own N) and the per-level view of one model, which is not Figure 1 (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_reproduce_stats import write_checkpoint

from lsemil.commands import reproduce
from lsemil.core import configuration
from lsemil.models import mil
from lsemil.reporting import drawing
from lsemil.training import trainer
from lsemil.workflows import evaluation, reproduction


def test_report_figure1_panels_and_boxes(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.random((64, 64))
  panels = [(f"N={n}", rng.random((n, n))) for n in (8, 16, 32, 64)]
  fig = drawing.figure1(tmp_path / "f.png", img, panels, title="Nodule", boxes=[(0, 0, 512, 256)])
  assert [ax.get_title() for ax in fig.axes] == [
    "Nodule", "N=8 (8x8)", "N=16 (16x16)", "N=32 (32x32)", "N=64 (64x64)",
  ]  # fmt: skip
  (box,) = fig.axes[0].patches  # the box on the image panel, scaled from 1024 px to 64 px
  assert box.get_width() == pytest.approx(32) and box.get_height() == pytest.approx(16)
  assert all(not ax.patches for ax in fig.axes[1:])
  with Image.open(tmp_path / "f.png") as im:
    assert im.size[0] > 4 * im.size[1]


def test_parse_figure1():
  assert reproduce.parse_figure1("N=16:runs/w") == (16, "runs/w")
  assert reproduce.parse_figure1("N=8:gs://b/w") == (8, "gs://b/w")


@pytest.fixture(scope="module")
def runs_by_n(tmp_path_factory, synth_dir, random_variables):
  """Random-weight smoke checkpoints at N = 8 and 16 (the smoke input has levels 32/16/8)."""
  tmp = tmp_path_factory.mktemp("fig1")
  out = {}
  for n in (8, 16):
    config = configuration.load_config("smoke", f"r0=5,N={n}")
    config.model.saliency_size = n  # the smoke config sets its own N after the paper's
    config.data.data_dir = str(synth_dir)
    model = mil.from_config(config.model)
    write_checkpoint(tmp / f"w{n}", config, random_variables(model, n), 7)
    out[n] = tmp / f"w{n}"
  return tmp, out


def test_figure1_one_model_per_n(runs_by_n, synth_dir):
  tmp, by_n = runs_by_n
  out = tmp / "R"
  summary = reproduction.reproduce_runs(
    [("r0=5", 5.0, by_n[16])], None, out, n_boot=0, progress=False, n_figure=1,
    figure1=[(16, by_n[16]), (8, by_n[8])], html=False,
  )  # fmt: skip
  assert summary["figures"][0] == "figure1.png"
  fig1 = summary["figure1"]
  assert fig1["N"] == [8, 16]  # sorted by N
  index = evaluation.open_index(configuration.load_config("smoke"), synth_dir)
  row = fig1["row"]
  assert index.image_ids[row] == fig1["image_id"] and row in index.rows("test").tolist()
  for n in (8, 16):  # each model's map at its own N
    sal = evaluation.load_saliency(by_n[n] / "evaluation_test_saliency_boxes.npz")
    assert sal["maps"][row].shape[:2] == (n, n)
  with Image.open(out / "figure1.png") as im:  # image + 2 panels
    assert im.size[0] / im.size[1] == pytest.approx(3, rel=0.05)
  # One model's levels are figure_levels.png, never Figure 1.
  assert "figure_levels.png" in summary["figures"]
  assert not (out / "index.html").exists()


def test_figure1_needs_a_shared_box_image(runs_by_n):
  tmp, by_n = runs_by_n
  (r,) = [
    reproduction.Run("N=8", None, str(by_n[8]), {}, {"maps": {}}, None, None, name="N=8"),
  ]
  with pytest.raises(reproduction.UserError, match="share no test image"):
    reproduction.figure1(tmp / "x.png", [(8, r)], None, "test", None)


def test_train_step_of_every_demo_n_builds():
  for n in (8, 16, 32, 64):
    config = configuration.load_config("demo", f"N={n}")
    model = mil.from_config(config.model)
    assert model.saliency_size == n
    trainer.validate_config(config)
