"""The Grad-CAM / CAM baseline through the real CLI: localization protocols, calibration.

`configs/baseline_gap.py:size=demo` shrunk to smoke scale with --config.model.* overrides is
trained by `lsemil train` for a few steps on the `synth_dir` data (what `lsemil synth` writes);
then `lsemil evaluate --saliency gradcam` and `--saliency cam` run through the one inference
path and write the weak-localization protocols and the calibration; `--calibrate temperature` writes
parameters that `lsemil predict --calibration` applies, with --boxes from the CAM maps.
A MIL checkpoint refuses the GAP sources (and a GAP run the MIL one) with one-line errors.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from lsemil.commands import cli
from lsemil.core import configuration
from lsemil.core.errors import ConfigError
from lsemil.data import nih
from lsemil.inference import engine
from lsemil.metrics import calibration
from lsemil.models import registry
from lsemil.reporting import paper_tables
from lsemil.workflows import evaluation, prediction

# Cheaper XLA CPU compiles for this module (flax's example tests do the same).
pytestmark = pytest.mark.usefixtures("fast_compiles")

SMOKE_GAP = [
  "--config.model.input_size=64",
  "--config.model.stem_features=8",
  "--config.model.widths=(8, 16, 32)",
  "--config.model.blocks_per_level=(0, 0, 0)",
  "--config.model.group_norm_groups=4",
  "--config.train.batch_size=8",
  "--config.train.eval_batch_size=16",
  "--config.train.num_steps=3",
  "--config.train.eval_every_steps=3",
  "--config.train.log_every_steps=1",
]
N_BOOT = 20


@pytest.fixture(scope="module")
def gap_workdir(synth_dir, tmp_path_factory):
  w = tmp_path_factory.mktemp("gap") / "w"
  argv = ["train", "--config", "configs/baseline_gap.py:size=demo", "--workdir", str(w)]
  assert cli.main([*argv, "--data-dir", str(synth_dir), *SMOKE_GAP]) == 0
  return w


@pytest.fixture(scope="module")
def evaluations(gap_workdir):
  """{source: loaded evaluation JSON} of `lsemil evaluate --saliency gradcam | cam`."""
  out = {}
  for source, extra in (("gradcam", ["--calibrate", "temperature"]), ("cam", [])):
    argv = ["evaluate", "--workdir", str(gap_workdir), "--saliency", source]
    assert cli.main([*argv, "--n-boot", str(N_BOOT), "--no-progress", *extra]) == 0
    # The run's own source keeps the default name; another source gets its own files.
    name = "evaluation_test.json" if source == "gradcam" else "evaluation_test_cam.json"
    out[source] = evaluation.load_evaluation(gap_workdir / name)
  return out


def test_trained_run_is_the_gap_model(gap_workdir):
  saved = json.loads((gap_workdir / "config.json").read_text())
  assert saved["model"]["arch"] == "gap" and saved["model"]["widths"] == [8, 16, 32]
  loaded = engine.load(gap_workdir)
  assert type(loaded.model).__name__ == "GlobalAveragePoolingClassifier"
  assert set(loaded.variables["params"]) >= {"head", "stem"}


def test_evaluate_gradcam_and_cam_write_the_protocols(evaluations, gap_workdir, synth_dir):
  config = configuration.load_config("configs/baseline_gap.py:size=demo")
  index = evaluation.open_index(config, synth_dir)
  test_rows = set(index.rows("test").tolist())
  box_rows = sorted(set(index.box_rows.tolist()) & test_rows)
  box_classes = {
    nih.CLASSES[k] for r, k in zip(index.box_rows, index.box_classes, strict=True) if r in test_rows
  }
  assert box_rows and box_classes
  for source, r in evaluations.items():
    assert r["arch"] == "gap" and r["saliency_source"] == source
    assert r.get("gradcam_level") == (-1 if source == "gradcam" else None)
    assert "r0" not in r and r["config_name"] == "baseline_gap_demo"
    assert r["num_saliency_kept"] == len(box_rows)
    protocols = r["protocols"]
    for p in paper_tables.TABLE4_PROTOCOLS:
      assert set(protocols[p]) == box_classes, p
    assert protocols["settings"]["n_boot"] == N_BOOT
    # Two code paths, one number: the protocols' DICE is evaluate's DICE column.
    for cls in box_classes:
      assert protocols["dice"][cls]["value"] == pytest.approx(r["dice"][cls], abs=1e-9)
      assert protocols["dice"][cls]["constant"] == pytest.approx(r["dice_uniform"][cls], abs=1e-9)
    # Calibration of the raw probabilities, from the per-image CSV.
    csv_probs = engine.read_predictions_csv(gap_workdir / r["predictions_file"])
    rows = index.rows("test")
    probs = np.stack([csv_probs[index.image_ids[i]] for i in rows])
    labels = np.asarray(index.labels, np.float64)[rows]
    want = calibration.calibration_metrics(probs, labels, nih.CLASSES)
    assert r["calibration"]["ece_overall"] == pytest.approx(want["ece_overall"], abs=1e-6)
    assert r["calibration"]["brier_overall"] == pytest.approx(want["brier_overall"], abs=1e-6)
  # Same classifier, same probabilities; different maps, each min-max scaled to [0, 1].
  g, c = evaluations["gradcam"], evaluations["cam"]
  pg, pc = (engine.read_predictions_csv(gap_workdir / e["predictions_file"]) for e in (g, c))
  assert sorted(pg) == sorted(pc)
  for image_id in pg:
    np.testing.assert_array_equal(pg[image_id], pc[image_id])
  maps = {
    s: evaluation.load_saliency(gap_workdir / e["saliency_file"])["maps"]
    for s, e in evaluations.items()
  }
  assert sorted(maps["cam"]) == box_rows
  differ = False
  for row in box_rows:
    for s in maps:
      m = maps[s][row]
      lo, hi = m.min(axis=(0, 1)), m.max(axis=(0, 1))
      assert np.all((lo == 0) & ((hi == 1) | (hi == 0))), (s, row)
    differ |= not np.allclose(maps["gradcam"][row], maps["cam"][row], atol=1e-2)
  assert differ  # Grad-CAM is relu(CAM) rescaled: different wherever the CAM goes negative


def test_calibration_fit_then_predict_applies_it(evaluations, gap_workdir, synth_dir, tmp_path):
  r = evaluations["gradcam"]
  params_file = gap_workdir / r["calibration_file"]
  params = json.loads(params_file.read_text())
  assert params["method"] == "temperature" and len(params["temperature"]) == len(nih.CLASSES)
  assert r["calibration_fitted"]["method"] == "temperature"
  assert r["calibration_fitted"]["fit_split"] == "valid"
  config = configuration.load_config("configs/baseline_gap.py:size=demo")
  index = evaluation.open_index(config, synth_dir)
  assert r["calibration_fitted"]["fit_images"] == len(index.rows("valid"))
  # The fitted numbers are the raw test probabilities mapped by the stored parameters.
  raw = engine.read_predictions_csv(gap_workdir / r["predictions_file"])
  rows = index.rows("test")
  probs = np.stack([raw[index.image_ids[i]] for i in rows])
  fitted = calibration.apply(params, probs)
  want = calibration.calibration_metrics(fitted, np.asarray(index.labels)[rows], nih.CLASSES)
  assert r["calibration_fitted"]["ece_overall"] == pytest.approx(want["ece_overall"], abs=1e-6)
  # predict --calibration applies them; --boxes from the run's CAM maps.
  image_id = index.image_ids[rows[0]]
  out = tmp_path / "P"
  argv = ["predict", "--checkpoint", str(gap_workdir), str(index.image_paths[rows[0]])]
  argv += ["--out", str(out), "--calibration", str(params_file), "--boxes", "--threshold", "0"]
  argv += ["--saliency", "cam"]  # a CAM map is never constant here; Grad-CAM's can be all 0
  assert cli.main([*argv, "--no-progress"]) == 0
  got = engine.read_predictions_csv(out / "predictions.csv")[image_id]
  np.testing.assert_allclose(got, calibration.apply(params, raw[image_id]), atol=2e-6)
  boxes = json.loads((out / prediction.BOXES_FILE).read_text())[image_id]
  h, w = cv2.imread(str(index.image_paths[rows[0]]), cv2.IMREAD_GRAYSCALE).shape
  for cls in nih.CLASSES:  # min-max scaled CAMs reach 1: every class has its peak's box
    assert boxes[cls] and boxes[cls][0]["peak"] == pytest.approx(1.0), cls
    for b in boxes[cls]:
      assert b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["w"] <= w and b["y"] + b["h"] <= h


def _mil_workdir(root, random_variables, write_checkpoint):
  config = configuration.load_config("smoke")
  model = registry.from_config(config.model, saved=True)  # with or without model.arch
  write_checkpoint(root, config, random_variables(model, seed=2), 1)
  return root


def _one_error(capsys) -> str:
  err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lsemil evaluate:")]
  assert len(err) == 1, err
  return err[0]


def test_sources_refused_by_the_other_architecture(
  gap_workdir, synth_dir, tmp_path, random_variables, write_checkpoint, capsys
):
  mil = _mil_workdir(tmp_path / "mil", random_variables, write_checkpoint)
  base = ["--data-dir", str(synth_dir), "--no-progress"]
  assert cli.main(["evaluate", "--workdir", str(mil), "--saliency", "gradcam", *base]) == 1
  msg = _one_error(capsys)
  assert "--saliency gradcam" in msg and "MIL" in msg
  assert cli.main(["evaluate", "--workdir", str(gap_workdir), "--saliency", "model", *base]) == 1
  assert "--saliency model" in _one_error(capsys)
  argv = ["evaluate", "--workdir", str(gap_workdir), "--gradcam-level", "3", *base]
  assert cli.main(argv) == 1  # 3 levels: 0, 1, 2 (or -1)
  assert "--gradcam-level 3" in _one_error(capsys)
  assert not list(mil.glob("evaluation_*"))  # refused before anything was written


# --------------------------------------------------------------------------- architectures


def test_architecture_dispatch_and_saliency_settings():
  gap_cfg = configuration.load_config("configs/baseline_gap.py:size=demo")
  mil_cfg = configuration.load_config("demo")
  gap = registry.from_config(gap_cfg.model)
  assert type(gap).__name__ == "GlobalAveragePoolingClassifier"
  assert registry.arch_of(gap) == "gap"
  spec = registry.validate(gap_cfg.model)
  assert spec.level_sides == (64, 32, 16, 8) and spec.fused_levels == ()
  mil_fields = {k: mil_cfg.model[k] for k in mil_cfg.model.keys() if k != "arch"}
  # A config without model.arch: refused, except a checkpoint's (runs before the field: MIL).
  with pytest.raises(ConfigError, match="arch"):
    registry.from_config(mil_fields)
  old = registry.from_config(mil_fields, saved=True)
  assert type(old).__name__ == "MultiResolutionMIL" and registry.arch_of(old) == "mil"
  new = registry.from_config({**mil_fields, "arch": "mil"})  # the field is not the model's
  assert new == old
  assert registry.validate({**mil_fields, "arch": "mil"}).level_sides == (64, 32, 16, 8)
  with pytest.raises(ConfigError, match="arch"):
    registry.from_config({**mil_fields, "arch": "vit"})
  # The run's saliency source: MIL -> model; GAP -> config.saliency (gradcam at -1).
  assert registry.saliency_settings(gap_cfg) == ("gradcam", -1)
  assert registry.saliency_settings(gap_cfg, "cam") == ("cam", None)
  assert registry.saliency_settings(gap_cfg, None, 0) == ("gradcam", 0)
  gap_cfg.saliency.source = "cam"
  assert registry.saliency_settings(gap_cfg) == ("cam", None)
  assert registry.saliency_settings(mil_cfg) == ("model", None)
  for cfg, bad in ((mil_cfg, "gradcam"), (mil_cfg, "cam"), (gap_cfg, "model")):
    with pytest.raises(ConfigError, match=f"--saliency {bad}"):
      registry.saliency_settings(cfg, bad)
  with pytest.raises(ConfigError, match="--gradcam-level -5"):
    registry.saliency_settings(gap_cfg, "gradcam", -5)


def test_predictor_refuses_a_source_the_model_lacks(random_variables):
  cfg = configuration.load_config("configs/baseline_gap.py:size=demo").model
  gap = registry.from_config(cfg)
  v = random_variables(gap)
  with pytest.raises(ConfigError, match="--saliency model"):
    engine.Predictor(gap, v, saliency_source="model")
  with pytest.raises(ConfigError, match="--gradcam-level 4"):
    engine.Predictor(gap, v, gradcam_level=4)
  p = engine.Predictor(gap, v)
  assert (p.saliency_source, p.gradcam_level) == ("gradcam", -1)
  assert engine.Predictor(gap, v, saliency_source="cam").gradcam_level is None
