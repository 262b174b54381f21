"""`lsemil export` (lsemil.workflows.release) and `lsemil.load`, on a real checkpoint of the smoke
config with random weights (no training).

One prediction path: `lsemil predict`'s CSV on a workdir and on its export, `lsemil.load` of
both, give the same float32 probabilities for the same file; the exported model.onnx in
onnxruntime matches JAX. Export refuses non-finite weights and a folder of other files, each
with one error line. Operating points: `evaluate --split valid --operating-point` chooses
per-class thresholds, `evaluate --split test` scores them, export writes them.
"""

from __future__ import annotations

import csv as csv_module
import json
import shutil
from types import SimpleNamespace

import cv2
import jax
import numpy as np
import pytest
import yaml

import lsemil
from lsemil.commands import cli
from lsemil.core import configuration
from lsemil.data.nih import CLASSES
from lsemil.inference import engine, onnx_graph
from lsemil.metrics import calibration, operating_points
from lsemil.models import registry
from lsemil.runtime import bundle
from lsemil.workflows import evaluation, prediction, release

pytestmark = pytest.mark.usefixtures("fast_compiles")

STEP = 4


def _evaluation(split: str, step: int, **extra) -> dict:
  auc = {c: 0.5 + 0.02 * k for k, c in enumerate(CLASSES)}
  return {
    "split": split, "step": step, "checkpoint": "/machine/w/checkpoints/4", "data_dir": "/d",
    "num_images": 40, "num_patients": 20, "auc": auc,
    "auc_lo": {c: v - 0.1 for c, v in auc.items()}, "auc_hi": {c: v + 0.1 for c, v in auc.items()},
    "mean_auc": float(np.mean(list(auc.values()))), "dice": {"Mass": 0.25},
    "dice_uniform": {"Mass": 0.125},
    "protocols": {"chexlocalize_miou_otsu": {"Mass": {"value": 0.3, "lo": 0.2, "hi": 0.4}}},
    **extra,
  }  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_variables, write_checkpoint):
  """A workdir (one checkpoint, a test evaluation of its step with a calibration, a stale
  valid evaluation) exported through the CLI with model.onnx."""
  tmp = tmp_path_factory.mktemp("export")
  config = configuration.load_config("smoke")
  variables = random_variables(registry.from_config(config.model), seed=2)
  w, out = tmp / "w", tmp / "out"
  write_checkpoint(w, config, variables, STEP)
  temps = [1.0 + 0.1 * k for k in range(len(CLASSES))]
  cal = {"method": "temperature", "classes": list(CLASSES), "temperature": temps}
  (w / "evaluation_test_calibration.json").write_text(json.dumps(cal))
  test = _evaluation("test", STEP, calibration_file="evaluation_test_calibration.json")
  (w / "evaluation_test.json").write_text(json.dumps(test))
  (w / "evaluation_valid.json").write_text(json.dumps(_evaluation("valid", STEP - 2)))
  assert cli.main(["export", "--workdir", str(w), "--out", str(out)]) == 0
  return SimpleNamespace(w=w, out=out, config=config, variables=variables, temps=temps)


def test_the_exported_folder(run):
  assert sorted(p.name for p in run.out.iterdir()) == sorted(release.FILES)
  head = json.loads((run.out / "config.json").read_text())
  assert head["classes"] == list(CLASSES) and head["step"] == STEP
  assert head["model"]["input_size"] == 64 and head["model"]["saliency_size"] == 16
  pre = json.loads((run.out / "preprocessing.json").read_text())
  assert pre["input"]["dtype"] == "uint8" and pre["input"]["shape"] == ["B", 64, 64, 1]
  assert "WindowCenter" in json.dumps(pre["decode"]["dicom"])
  cal = json.loads((run.out / "calibration.json").read_text())
  assert cal["temperature"] == run.temps and cal["fitted_on"] == "valid"
  assert json.loads((run.out / "thresholds.json").read_text())["thresholds"] is None
  metrics = json.loads((run.out / "metrics.json").read_text())
  assert list(metrics) == ["test"]  # valid evaluated step 2, not the exported 4
  assert "checkpoint" not in metrics["test"] and "data_dir" not in metrics["test"]
  text = (run.out / "README.md").read_text()
  front = yaml.safe_load(text.split("---\n")[1])
  assert front["license"] == "apache-2.0" and {"onnx", "safetensors"} <= set(front["tags"])
  assert front["metrics"] == ["roc_auc", "dice"] and "datasets" not in front  # synthetic data
  assert "**Research, not for clinical use.**" in text and "Synthetic phantoms" in text
  assert "| Atelectasis | 0.500 | 0.400-0.600 |" in text and "| Mass | 0.580 |" in text
  assert "| chexlocalize_miou_otsu | 0.300 | 1 |" in text and "/machine" not in text


def test_one_prediction_path(run, tmp_path, phantom_image, capsys):
  """predict's CSV (workdir and export) == lsemil.load(export) == lsemil.load(workdir)."""
  gray = cv2.resize(phantom_image(5, 600), (600, 480))  # not square, above 512 px
  path = tmp_path / "chest.png"
  assert cv2.imwrite(str(path), gray)
  csv = {}
  for name, source in (("w", run.w), ("out", run.out)):
    argv = ["predict", "--checkpoint", str(source), str(path), "--out", str(tmp_path / name)]
    assert cli.main([*argv, "--no-progress", "--threshold", "1"]) == 0  # no overlays drawn
    csv[name] = engine.read_predictions_csv(tmp_path / name / "predictions.csv")["chest.png"]
  capsys.readouterr()
  from_export, from_workdir = lsemil.load(run.out), lsemil.load(run.w)
  assert isinstance(from_export, lsemil.TrainedModel) and from_export.step == STEP
  image = prediction.read_image(path)
  p_export = from_export.forward(image)["probs"][0]
  p_workdir = from_workdir.forward([image])["probs"][0]
  assert p_export.dtype == np.float32
  np.testing.assert_array_equal(p_export, p_workdir)
  np.testing.assert_array_equal(csv["w"].astype(np.float32), p_export)
  np.testing.assert_array_equal(csv["out"].astype(np.float32), p_export)
  assert np.ptp(p_export) > 1e-3  # 14 different numbers, not a constant
  # The workdir's evaluate --calibrate fit (and the export's calibration.json) beside them.
  want = calibration.apply({"method": "temperature", "temperature": run.temps}, p_export)
  for name in ("w", "out"):
    rows = list(csv_module.DictReader((tmp_path / name / "predictions.csv").open()))
    got = [float(rows[0][f"{c}_calibrated"]) for c in CLASSES]
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_onnx_matches_jax(run, phantom_image):
  model = lsemil.load(run.out)
  sess = onnx_graph.session(run.out / release.ONNX_FILE)
  assert [(i.name, i.type, i.shape) for i in sess.get_inputs()] == [
    ("image", "tensor(uint8)", ["B", 64, 64, 1])
  ]
  images = np.stack([model.preprocess(phantom_image(s, 256)) for s in range(3)])
  got, want = onnx_graph.run(sess, images), model.forward(images)
  assert got["probs"].shape == (3, 14) and got["saliency"].shape == (3, 16, 16, 14)
  np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(got["saliency"], want["saliency"], atol=1e-3, rtol=0)
  assert np.abs(got["probs"] - want["probs"]).max() < 1e-5  # float32 rounding, in fact


def test_export_refuses_bad_weights_and_foreign_folders(
  run, tmp_path, write_checkpoint, random_variables, capsys
):
  bad = jax.tree.map(np.copy, run.variables)
  bad["params"]["head"]["bias"][3] = np.inf
  write_checkpoint(tmp_path / "w", run.config, bad, STEP)
  out = tmp_path / "out"
  assert cli.main(["export", "--workdir", str(tmp_path / "w"), "--out", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("lsemil export: ")
  assert "non-finite weights: ['params']['head']['bias']" in err[0] and not out.exists()
  (out / "notes").mkdir(parents=True)
  assert cli.main(["export", "--workdir", str(run.w), "--out", str(out), "--no-onnx"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"--out {out}: holds other files" in err[0]
  gap = configuration.load_config("baseline_gap:size=demo")
  gap_vars = random_variables(registry.from_config(gap.model))
  write_checkpoint(tmp_path / "gap", gap, gap_vars, STEP)
  argv = ["export", "--workdir", str(tmp_path / "gap"), "--out", str(tmp_path / "gap_out")]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "ONNX export covers the MIL model only" in err[0]
  assert not (tmp_path / "gap_out").exists()  # refused before anything is written
  again = tmp_path / "again"  # an export re-exported in place: no stale graph, same results
  shutil.copytree(run.out, again)
  assert cli.main(["export", "--workdir", str(again), "--out", str(again), "--no-onnx"]) == 0
  assert bundle.read(again)[3]["step"] == STEP and not (again / release.ONNX_FILE).exists()
  for name in ("metrics.json", "calibration.json", "config.json"):
    assert (again / name).read_text() == (run.out / name).read_text(), name


def test_operating_points_from_evaluate_to_export(run, tmp_path, synth_dir, capsys):
  w = tmp_path / "w"
  shutil.copytree(run.w, w, ignore=shutil.ignore_patterns("evaluation_*"))
  base = ["evaluate", "--workdir", str(w), "--data-dir", str(synth_dir), "--n-boot", "0"]
  base += ["--no-protocols", "--no-progress"]
  assert cli.main([*base, "--split", "valid", "--operating-point", "sens=0.8"]) == 0
  assert "operating points (sens=0.8, chosen on valid)" in capsys.readouterr().out
  index = evaluation.open_index(run.config, synth_dir)
  valid = evaluation.load_evaluation(w / "evaluation_valid.json")["operating_points"]
  probs = engine.read_predictions_csv(w / "evaluation_valid_predictions.csv")
  rows = index.rows("valid")
  p = np.stack([probs[index.image_ids[r]] for r in rows])
  want = operating_points.choose(p, index.labels[rows], "sens=0.8", CLASSES)
  assert valid["thresholds"] == pytest.approx(want["thresholds"], abs=1e-6)
  assert all(s is None or s >= 0.8 for s in valid["sensitivity"])
  assert sum(t is not None for t in valid["thresholds"]) >= 5
  assert cli.main([*base, "--split", "test", "--n-boot", "30"]) == 0  # the stored thresholds
  test = evaluation.load_evaluation(w / "evaluation_test.json")["operating_points"]
  probs = engine.read_predictions_csv(w / "evaluation_test_predictions.csv")
  rows = index.rows("test")
  p = np.stack([probs[index.image_ids[r]] for r in rows])
  rates = operating_points.rates(valid["thresholds"], p, index.labels[rows])
  assert test["thresholds"] == valid["thresholds"] and test["rule"] == "sens=0.8"
  assert test["specificity"] == pytest.approx(rates["specificity"], abs=1e-9)
  bounds = zip(test["specificity_lo"], test["specificity"], test["specificity_hi"], strict=True)
  for lo, v, hi in bounds:  # patient-bootstrap intervals
    assert (lo is None and v is None) or lo <= v <= hi
  out = tmp_path / "out"
  assert cli.main(["export", "--workdir", str(w), "--out", str(out), "--no-onnx"]) == 0
  stored = json.loads((out / release.THRESHOLDS_FILE).read_text())
  assert stored["thresholds"] == valid["thresholds"] and "p >= threshold" in stored["decision"]
  assert "### Operating thresholds (`sens=0.8`" in (out / "README.md").read_text()
  image = index.image_paths[index.rows("test")[0]]
  decided = {}
  for name, source in (("w", w), ("out", out)):  # the stored thresholds, on both
    argv = ["predict", "--checkpoint", str(source), str(image), "--out", str(tmp_path / name)]
    assert cli.main([*argv, "--no-progress", "--threshold", "1"]) == 0
    assert "decisions: p >= per-class thresholds (sens=0.8 rule" in capsys.readouterr().err
    table = (tmp_path / name / "predictions.csv").read_text().splitlines()
    decided[name] = dict(zip(table[0].split(","), table[1].split(","), strict=True))
  probs = engine.read_predictions_csv(tmp_path / "w" / "predictions.csv")[image.name]
  for k, c in enumerate(CLASSES):
    t = valid["thresholds"][k]
    assert decided["w"][f"{c}_decision"] == ("" if t is None else str(int(probs[k] >= t)))
  assert decided["w"] == {**decided["out"], "path": decided["w"]["path"]}


@pytest.mark.parametrize(
  "marker, kind",
  [
    ({"kind": "prepared", "prepared_from": "synthetic"}, "synthetic"),  # the demo's data
    ({"kind": "prepared", "prepared_from": "nih"}, "nih"),  # the release, prepared
    ({"kind": "prepared"}, "unknown"),  # prepared before the origin was recorded
    ({"kind": "synthetic"}, "synthetic"),
    (None, "nih"),  # no marker: the release as NIH gives it
    ({"kind": "synthetic", "layout": "chexpert"}, "chexpert:synthetic"),  # synth --layout
    ({"kind": "prepared", "prepared_from": "synthetic"}, "chexpert:synthetic"),
    (None, "chexpert:chexpert"),  # another source's release: its name
  ],
)
def test_the_model_cards_training_data_follows_a_prepared_folder(tmp_path, marker, kind):
  if marker is not None:
    (tmp_path / "lsemil_dataset.json").write_text(json.dumps(marker))
  config = configuration.load_config("smoke")
  config.data.data_dir = str(tmp_path)
  source, _, kind = kind.rpartition(":")
  with config.unlocked():
    config.data.source = source or "nih"
  assert release._data_kind(config) == kind
