"""`lsemil predict --boxes` (issue 12 section 3) and `--calibration` (issue 14 section 3).

The geometry is tested through `prediction.predict_files` on a model whose saliency we control
(its map is its own input, so a bright planted lesion is the map's blob): the box must come back
in the input file's own pixels, on non-square files below and above 512 px. The CLI is tested on
a real checkpoint (random smoke weights, `checkpointing.save`): boxes.json equals
`localization.boxes_from_map` of the maps the one inference path gives, and --calibration
applies the parameters `evaluate --calibrate` writes.
"""

from __future__ import annotations

import json

import cv2
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lsemil.commands import cli
from lsemil.core import configuration
from lsemil.data.nih import CLASSES
from lsemil.inference import engine
from lsemil.metrics import calibration, localization
from lsemil.models import registry
from lsemil.runtime import checkpointing
from lsemil.training import trainer
from lsemil.workflows import prediction

LESION = 200  # grey level of the planted lesion; background 20 (saliency 0.78 vs 0.08)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
  """Cheaper XLA CPU compiles for this module (as tests/test_cam.py)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


class InputIsSaliency(nn.Module):
  """A 'model' with the MIL contract whose class-0 map is its input (class 1: mirrored left
  to right, the other classes 0) and whose probability is the map's maximum."""

  input_size: int = 256

  @nn.compact
  def __call__(self, x, train: bool):
    s = x.astype(jnp.float32)[..., 0] / 255.0  # (B, S, S)
    maps = jnp.zeros((*s.shape, len(CLASSES)), jnp.float32)
    maps = maps.at[..., 0].set(s).at[..., 1].set(s[:, :, ::-1])
    return {"probs": maps.max(axis=(1, 2)), "saliency": maps}


def planted(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
  x, y, bw, bh = box
  img = np.full((h, w), 20, np.uint8)
  img[y : y + bh, x : x + bw] = LESION
  return img


@pytest.mark.parametrize(
  "hw, box, tol",
  [
    ((300, 480), (300, 60, 80, 75), 2.0),  # below 512: stretched to the square input
    ((1000, 760), (90, 610, 150, 220), 2.0),  # above 512: prepared at 512 first
  ],
)
def test_planted_lesion_box_in_the_files_own_pixels(tmp_path, hw, box, tol):
  h, w = hw
  path = tmp_path / "lesion.png"
  assert cv2.imwrite(str(path), planted(h, w, box))
  config = configuration.load_config("smoke")  # no model.arch: a MIL run ('model' saliency)
  loaded = engine.LoadedModel(config, InputIsSaliency(), {}, 0, "none", {})
  rows, failures = prediction.predict_files(
    loaded, [str(path)], tmp_path / "P", threshold=0.5, boxes=True, box_tau=0.5, progress=False
  )
  assert failures == [] and len(rows) == 1
  got = json.loads((tmp_path / "P" / prediction.BOXES_FILE).read_text())
  assert list(got) == ["lesion.png"] and set(got["lesion.png"]) == {CLASSES[0], CLASSES[1]}
  assert got["lesion.png"] == rows[0]["boxes"]
  x, y, bw, bh = box
  for cls, want_x in ((CLASSES[0], x), (CLASSES[1], w - x - bw)):  # class 1: mirrored
    (b,) = got["lesion.png"][cls]
    assert abs(b["x"] - want_x) <= tol and abs(b["y"] - y) <= tol, (cls, b)
    assert abs(b["w"] - bw) <= tol and abs(b["h"] - bh) <= tol, (cls, b)
    assert b["peak"] == pytest.approx(LESION / 255, abs=0.02)
    assert 0.5 <= b["mean"] <= b["peak"] + 1e-9
  # The overlays and the CSV are written for the same classes.
  assert rows[0]["overlays"] == [f"lesion_{CLASSES[0]}.png", f"lesion_{CLASSES[1]}.png"]


def test_no_box_below_tau_and_none_for_classes_below_the_threshold(tmp_path):
  path = tmp_path / "flat.png"
  assert cv2.imwrite(str(path), planted(200, 300, (50, 40, 30, 20)))
  loaded = engine.LoadedModel(
    configuration.load_config("smoke"), InputIsSaliency(), {}, 0, "none", {}
  )
  rows, _ = prediction.predict_files(
    loaded, [str(path)], None, threshold=0.5, boxes=True, box_tau=0.9, progress=False
  )
  # The lesion's 0.78 stays below tau = 0.9: the classes are listed, with no boxes.
  assert rows[0]["boxes"] == {CLASSES[0]: [], CLASSES[1]: []}
  rows, _ = prediction.predict_files(
    loaded, [str(path)], None, threshold=0.9, boxes=True, progress=False
  )
  assert rows[0]["boxes"] == {}


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def smoke_workdir(random_variables, tmp_path_factory):
  """A training workdir with random smoke weights as its one checkpoint (step 2)."""
  config = configuration.load_config("smoke")
  model = registry.from_config(config.model, saved=True)  # with or without model.arch
  variables = random_variables(model, seed=3)
  abstract = trainer.abstract_state(model, trainer.create_optimizer(config), 0)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  state = state.replace(
    step=np.int32(2), params=variables["params"], batch_stats=variables["batch_stats"]
  )
  w = tmp_path_factory.mktemp("boxes") / "w"
  manager = checkpointing.create_manager(w, keep=1, async_save=False)
  it = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
  checkpointing.save(
    manager, 2, state, it, config=config, meta={}, metrics={checkpointing.BEST_METRIC: 0.5}
  )
  manager.wait_until_finished()
  manager.close()
  return w


def test_cli_boxes_and_calibration_on_a_checkpoint(smoke_workdir, tmp_path, capsys):
  img = planted(240, 320, (200, 30, 60, 90))
  path = tmp_path / "chest.png"
  assert cv2.imwrite(str(path), img)
  temps = [0.5 + 0.1 * k for k in range(len(CLASSES))]
  cal_file = tmp_path / "cal.json"
  cal_file.write_text(
    json.dumps({"method": "temperature", "classes": CLASSES, "temperature": temps})
  )
  out = tmp_path / "P"
  argv = ["predict", "--checkpoint", str(smoke_workdir), str(path), "--out", str(out)]
  argv += ["--boxes", "--box-tau", "0.5", "--threshold", "0", "--calibration", str(cal_file)]
  assert cli.main([*argv, "--no-progress"]) == 0
  assert "boxes in" in capsys.readouterr().err
  boxes = json.loads((out / prediction.BOXES_FILE).read_text())["chest.png"]
  probs = engine.read_predictions_csv(out / "predictions.csv")["chest.png"]

  loaded = engine.load(smoke_workdir)
  x = engine.model_input(img, loaded.model.input_size)[None]
  direct = engine.Predictor(loaded.model, loaded.variables).predict_images(x, 1, saliency=True)
  want_p = calibration.apply({"method": "temperature", "temperature": temps}, direct["probs"])[0]
  np.testing.assert_allclose(probs, want_p, atol=1e-6)
  assert not np.allclose(probs, direct["probs"][0], atol=1e-3)  # the calibration changed them
  assert set(boxes) == set(CLASSES)  # threshold 0: every class
  for k, cls in enumerate(CLASSES):
    want = localization.boxes_from_map(direct["saliency"][0, ..., k], 0.5, img.shape)
    assert len(boxes[cls]) == len(want)
    for b, v in zip(boxes[cls], want, strict=True):
      assert b == pytest.approx(v, abs=1e-6)
      assert 0 <= b["x"] and b["x"] + b["w"] <= 320 + 1e-6 and b["y"] + b["h"] <= 240 + 1e-6


def test_cli_refuses_bad_calibration_and_a_gap_source_on_a_mil_run(smoke_workdir, tmp_path, capsys):
  path = tmp_path / "x.png"
  assert cv2.imwrite(str(path), planted(64, 64, (10, 10, 8, 8)))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"method": "temperature", "temperature": [1.0, 2.0]}))
  base = ["predict", "--checkpoint", str(smoke_workdir), str(path), "--out", str(tmp_path / "P")]
  assert cli.main([*base, "--calibration", str(bad)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(bad) in err[0] and "temperature" in err[0]
  assert cli.main([*base, "--saliency", "gradcam"]) == 1
  err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lsemil predict:")]
  assert len(err) == 1 and "--saliency gradcam" in err[0] and "MIL" in err[0]
  assert not (tmp_path / "P" / "predictions.csv").exists()  # refused before any output


# --------------------------------------------------------------------------- the box protocols


def test_small_map_scoring_equals_the_full_grid():
  """`localization.score_case` on a replicated small map (the fast path every model map takes
  at 512) gives the full 512 x 512 grid's values: ties, constant and all-zero maps included."""
  import scipy.ndimage

  rng = np.random.default_rng(0)
  cfg = {
    "size": 512,
    "taus": localization.DEFAULT_TAUS,
    "ts": localization.DEFAULT_TS,
    "thresholds": localization.MIOU_THRESHOLDS,
    "method": "nearest",
  }
  for i in range(25):
    n = (8, 16, 32, 64, 128)[i % 5]
    s = localization.minmax(scipy.ndimage.gaussian_filter(rng.random((n, n)), 1.0))
    s = [s, np.round(s * 4) / 4, np.full((n, n), 0.3), np.zeros((n, n)), 0.2 * s][i // 5]
    boxes = tuple(
      tuple(float(v) for v in (*rng.uniform(0, 400, 2), *rng.uniform(4, 150, 2)))
      for _ in range(1 + i % 2)
    )
    case = localization.Case(0, 0, boxes, 1)
    fast = localization.score_case(s, case, 512.0, cfg)
    full = localization.score_case(s, case, 512.0, cfg, blocks=False)
    assert fast.keys() == full.keys()
    for k, v in full.items():
      if k == "ap":
        for a, b in zip(fast[k], v, strict=True):
          np.testing.assert_array_equal(a, b)
      else:
        np.testing.assert_allclose(fast[k], v, rtol=0, atol=1e-12, err_msg=f"{k} map {i}")
  with pytest.raises(ValueError, match="replication"):
    localization.score_case(np.zeros((12, 12)), case, 512.0, cfg, blocks=True)
