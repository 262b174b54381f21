"""Tests of `lsemil evaluate` and `lsemil reproduce` (paper Sec 4.2-4.4, Tables 1-3, Figs 1/3).

A smoke-sized model with deterministic random weights runs over the `synth_dir` fixture; the
reproduce tests read it from real checkpoints (`checkpointing.save`, no training). One slow
test trains the smoke config and runs the real CLIs on its workdir.
"""

from __future__ import annotations

import csv
import io
import json
import math
import types

import numpy as np
import pytest
from PIL import Image

from lsemil.commands import cli, reproduce
from lsemil.core import configuration
from lsemil.core.errors import DataError
from lsemil.data import chexpert, nih, pipeline
from lsemil.inference import engine
from lsemil.metrics import classification, overlap
from lsemil.models import mil
from lsemil.training import trainer
from lsemil.workflows import evaluation, reproduction

N_BOOT = 50


@pytest.fixture(scope="module")
def smoke(synth_dir, random_variables):
  """(config, model, variables) of the smoke config, data_dir = synth_dir."""
  config = configuration.load_config("smoke")
  config.data.data_dir = str(synth_dir)
  model = mil.from_config(config.model)
  variables = random_variables(model)
  return config, model, variables


@pytest.fixture(scope="module")
def index(smoke, synth_dir):
  return evaluation.open_index(smoke[0], synth_dir)


@pytest.fixture(scope="module")
def split_eval(smoke, synth_dir, tmp_path_factory):
  """(EvalRun, F.json path, written paths) of the test split."""
  config, model, variables = smoke
  out = tmp_path_factory.mktemp("eval") / "evaluation_test.json"
  options = evaluation.EvalOptions(n_boot=N_BOOT, progress=False)
  run = evaluation.evaluate_split(
    engine.Predictor(model, variables), config, str(synth_dir), "test", options, step=3
  )
  paths = evaluation.write_outputs(run, config, str(synth_dir), out)
  return run, out, paths


def _reject_nan(text):
  raise ValueError(f"non-standard JSON constant {text}")


def test_evaluation_json_and_csv_parse(split_eval, index):
  run, out, paths = split_eval
  assert {k: p.name for k, p in paths.items()} == {
    "json": "evaluation_test.json",
    "csv": "evaluation_test.csv",
    "predictions": "evaluation_test_predictions.csv",
    "saliency": "evaluation_test_saliency_boxes.npz",
  }
  data = json.loads(out.read_text(), parse_constant=_reject_nan)  # strict JSON: no NaN
  assert data["split"] == "test" and data["step"] == 3
  assert data["predictions_file"] == paths["predictions"].name
  assert data["saliency_file"] == paths["saliency"].name
  assert data["num_images"] == len(index.rows("test"))
  assert data["num_patients"] == len(index.patients("test"))
  loaded = evaluation.load_evaluation(out)
  for cls in nih.CLASSES:
    auc = loaded["auc"][cls]
    assert math.isnan(auc) or 0.0 <= auc <= 1.0
    positives = data["num_positives"][cls]
    assert math.isnan(auc) == (positives in (0, data["num_images"]))
    if not math.isnan(auc):
      assert loaded["auc_lo"][cls] <= auc + 1e-9 <= loaded["auc_hi"][cls] + 2e-9
  defined = [v for v in loaded["auc"].values() if not math.isnan(v)]
  assert loaded["mean_auc"] == pytest.approx(np.mean(defined))
  rows = list(csv.DictReader(io.StringIO(out.with_suffix(".csv").read_text())))
  aucs = {r["class"]: r["value"] for r in rows if r["metric"] == "auc"}
  assert list(aucs) == list(nih.CLASSES)
  for cls, v in aucs.items():
    assert (v == "") == math.isnan(loaded["auc"][cls])
    if v:
      assert float(v) == pytest.approx(loaded["auc"][cls])
  # IoBB: every box class present in the test boxes, every tau of the sweep, values in [0, 1].
  box_classes = {
    nih.CLASSES[k] for k in index.box_classes[np.isin(index.box_rows, index.rows("test"))]
  }
  assert set(loaded["iobb"]) == box_classes == set(loaded["dice"])
  for by_tau in loaded["iobb"].values():
    assert set(by_tau) == {evaluation.tau_key(t) for t in evaluation.DEFAULT_TAUS}
    assert all(0.0 <= v <= 1.0 for v in by_tau.values())
  assert any(r["metric"] == "iobb_accuracy" and r["T"] == "0.5" for r in rows)


def test_per_image_predictions_csv_gives_the_json_aucs(split_eval, index):
  run, out, paths = split_eval
  text = paths["predictions"].read_text()
  assert next(csv.reader(io.StringIO(text))) == list(engine.csv_columns(nih.CLASSES))
  table = list(csv.DictReader(io.StringIO(text)))
  test_rows = index.rows("test")
  assert [t["image_id"] for t in table] == [index.image_ids[r] for r in np.sort(test_rows)]
  assert [int(t["patient_id"]) for t in table] == index.patient_ids[np.sort(test_rows)].tolist()
  probs = engine.read_predictions_csv(paths["predictions"])
  assert list(probs) == [t["image_id"] for t in table]
  np.testing.assert_allclose(np.stack(list(probs.values())), run.predictions.probs, rtol=1e-7)
  # The AUCs recomputed from the file alone are the JSON's.
  labels = index.labels[np.sort(test_rows)]
  aucs = classification.per_class_auc(labels, np.stack(list(probs.values())))
  loaded = evaluation.load_evaluation(out)
  for k, cls in enumerate(nih.CLASSES):
    assert aucs[k] == pytest.approx(loaded["auc"][cls], nan_ok=True)


def test_saliency_kept_only_for_images_with_boxes(split_eval, index, smoke):
  run, out, _ = split_eval
  result = run.result.to_dict()
  sal = evaluation.load_saliency(evaluation.saliency_path_for(out))
  test_rows = set(index.rows("test").tolist())
  with_boxes = set(index.box_rows.tolist()) & test_rows
  assert with_boxes and set(sal["maps"]) == with_boxes
  assert result["num_saliency_kept"] == len(with_boxes) < len(test_rows)
  n = smoke[0].model.saliency_size
  assert all(m.shape == (n, n, nih.NUM_CLASSES) for m in sal["maps"].values())
  assert sal["figure"], "Figure 3 candidates are stored"
  for row, _k, image, levels in sal["figure"]:
    assert row in with_boxes and image.ndim == 2 and image.dtype == np.uint8
    assert levels[-1].shape == (n, n, nih.NUM_CLASSES)
    assert [lv.shape[0] for lv in levels] == sorted(lv.shape[0] for lv in levels)
    assert np.allclose(levels[-1], sal["maps"][row], atol=1e-3)
  # DICE recomputed from the stored maps matches the JSON.
  cases = evaluation.box_cases(index, sal["maps"])
  cls = next(iter(result["dice"]))
  k = nih.CLASSES.index(cls)
  mine = [
    overlap.box_dice(sal["maps"][r][..., k], boxes, 512, index.box_space)
    for r, cs in cases.items()
    for kk, boxes in cs
    if kk == k
  ]
  assert result["dice"][cls] == pytest.approx(np.mean(mine), abs=1e-3)


def test_localization_metrics_perfect_and_empty_maps():
  # A map equal to the box scores DICE 1 and finds the box at every tau; an empty map none.
  box = (64.0, 128.0, 128.0, 64.0)  # x, y, w, h in 512 px
  mask = overlap.boxes_to_mask([box], 512, 512)
  perfect = np.zeros((512, 512, 2))
  perfect[..., 1] = mask
  empty = np.zeros((512, 512, 2))
  cases = {0: [(1, [box])], 1: [(1, [box])]}
  names = ("Opacity", "Lesion")  # the run's classes name the results
  loc = evaluation.localization_metrics({0: perfect}, cases, 512, classes=names, taus=(0.2, 0.7))
  cls = names[1]
  assert loc["dice"][cls] == pytest.approx(1.0)
  assert loc["dice_uniform"][cls] == pytest.approx(math.sqrt(mask.mean()))
  assert loc["iobb"][cls] == {"0.2": 1.0, "0.7": 1.0}
  assert loc["localization"]["iou"]["0.75"][cls]["0.7"] == 1.0
  loc = evaluation.localization_metrics(
    {0: perfect, 1: empty}, cases, 512, classes=names, taus=(0.5,)
  )
  assert loc["num_cases"][cls] == 2 and loc["num_boxes"][cls] == 2
  assert loc["iobb"][cls]["0.5"] == 0.5
  assert loc["dice"][cls] == pytest.approx(0.5)


def test_figure_cases_cover_different_classes(index):
  picks = evaluation.figure_cases(index, "test", 6)
  rows = [r for r, _ in picks]
  assert len(rows) == len(set(rows)) <= 6
  test_rows = set(index.rows("test").tolist())
  box_classes = {
    int(k) for r, k in zip(index.box_rows, index.box_classes, strict=True) if int(r) in test_rows
  }
  assert len({k for _, k in picks}) == min(len(picks), len(box_classes))
  for r, k in picks:
    assert k in [kk for kk, _ in index.boxes(r)]
  assert picks == evaluation.figure_cases(index, "test", 6)  # deterministic


# ---------------------------------------------------------------------------------- reproduce


@pytest.fixture
def runs_at(smoke, write_checkpoint):
  """fn(workdir, r0): a real checkpoint (step 7) of the smoke model with that r0."""
  config, _, variables = smoke

  def make(workdir, r0):
    cfg = config.copy_and_resolve_references()
    cfg.model.r0 = float(r0)
    write_checkpoint(workdir, cfg, variables, 7)
    return workdir

  return make


def _md_header(path):
  line = path.read_text().split("\n|", 1)[1].split("\n")[0]
  return [c.strip() for c in line.rstrip().rstrip("|").split("|")]


def test_reproduce_two_runs_then_one_reuses(tmp_path, runs_at, monkeypatch, synth_dir):
  runs = [("r0=0", 0.0, runs_at(tmp_path / "w0", 0)), ("r0=5", 5.0, runs_at(tmp_path / "w5", 5))]
  out = tmp_path / "R"
  summary = reproduction.reproduce_runs(runs, None, out, n_boot=N_BOOT, progress=False)
  for name in ("table1", "table2", "table2_sweep", "table3"):
    assert (out / f"{name}.md").is_file()
    list(csv.reader(io.StringIO((out / f"{name}.csv").read_text())))
  header = _md_header(out / "table3.md")
  for col in (
    "AUC [3] (paper)",
    "AUC r0=0 (paper)",
    "AUC r0=5 (paper)",
    "AUC r0=10 (paper)",
    "AUC r0=0 (ours)",
    "AUC r0=5 (ours)",
    "DICE r0=5 (paper)",
    "DICE uniform (ours)",
  ):
    assert col in header
  t3 = (out / "table3.md").read_text()
  assert "| Atelectasis | 0.7003 | 0.733 | 0.728 | 0.724 |" in t3 and "A.V.G." in t3
  t2 = (out / "table2.md").read_text()
  assert "r0=0 (ours)" in t2 and "r0=5 (ours)" in t2 and "r0=5 (paper) | 0.5083" in t2
  t1 = (out / "table1.csv").read_text().splitlines()
  assert len(t1) == 1 + nih.NUM_CLASSES
  data = json.loads((out / "summary.json").read_text(), parse_constant=_reject_nan)
  # Figure 3 and the per-level view of one model (the paper's Figure 1 proper needs --figure1).
  assert data["labels"] == ["r0=0", "r0=5"]
  assert data["figures"][:2] == ["figure3.png", "figure_levels.png"]
  assert [r["r0"] for r in data["runs"]] == [0.0, 5.0]
  assert summary["table1"]["images"]["test"] == data["runs"][0]["num_images"]
  for fig in data["figures"]:
    with Image.open(out / fig) as im:
      assert im.format == "PNG" and im.size[0] > 200
  with Image.open(out / "figure3.png") as im:  # 4 panels per row: image, truth, 2 runs
    assert im.size[0] / im.size[1] == pytest.approx(4 / len(summary["figure3_cases"]), 0.05)
  # The evaluations were stored in the workdirs; a second reproduce reuses them.
  for name in ("evaluation_test.json", "evaluation_test_predictions.csv"):
    assert (tmp_path / "w5" / name).is_file()
  stored = evaluation.load_evaluation(tmp_path / "w5" / "evaluation_test.json")
  assert stored["step"] == 7 and stored["r0"] == 5.0 and stored["which"] == "best"

  def no_eval(*a, **k):
    raise AssertionError("evaluated again although a matching evaluation exists")

  monkeypatch.setattr(evaluation, "evaluate_checkpoint", no_eval)
  out1 = tmp_path / "R1"
  one = reproduction.reproduce_runs([runs[1]], None, out1, progress=False)
  assert one["labels"] == ["r0=5"] and (out1 / "figure3.png").is_file()
  assert "AUC r0=5 (ours)" in _md_header(out1 / "table3.md")
  assert one["runs"][0]["auc"] == pytest.approx(summary["runs"][1]["auc"], nan_ok=True)


def test_reproduce_cli_custom_taus_and_errors(tmp_path, runs_at, capsys):
  out = tmp_path / "R"
  rc = cli.main(
    [
      "reproduce",
      "--run",
      f"r0=10:{runs_at(tmp_path / 'w10', 10)}",
      "--out",
      str(out),
      "--tau",
      "Nodule=0.35,0.8",
      "--figure-images",
      "2",
      "--n-boot",
      "0",
      "--no-progress",
    ]
  )
  assert rc == 0
  header = _md_header(out / "table2.md")
  assert header[1:] == ["Nodule τ=0.35", "Nodule τ=0.8"]  # 0.35 filled in from the saliency
  row = next(
    r for r in csv.DictReader(io.StringIO((out / "table2.csv").read_text())) if r["run"] == "r0=10"
  )
  assert row["Nodule@tau=0.35"] != ""
  capsys.readouterr()
  # Bad arguments: argparse's exit 2, naming the problem.
  for argv, words in [
    (["--tau", "Edema=0.5"], "Edema has no boxes"),
    (["--tau", "Nodule=1.5"], "(0, 1)"),
    (["--run", "r0=1e999:W"], "finite"),
  ]:
    with pytest.raises(SystemExit) as e:
      cli.main(["reproduce", "--run", f"x:{tmp_path / 'w1'}", "--out", str(out), *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err
  # A run folder without checkpoints: one line naming it, exit 1.
  assert cli.main(["reproduce", "--run", f"x:{tmp_path / 'w1'}", "--out", str(out)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("lsemil reproduce: ") and str(tmp_path / "w1") in err[-1]
  assert reproduce.parse_run("r0=5:gs://b/w") == ("r0=5", 5.0, "gs://b/w")
  assert reproduce.parse_run("gs://b/w") == ("gs://b/w", None, "gs://b/w")


def test_evaluate_cli_errors(tmp_path, capsys):
  assert cli.main(["evaluate", "--workdir", str(tmp_path / "nothing")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("lsemil evaluate: ")
  assert str(tmp_path / "nothing") in err[0]
  with pytest.raises(SystemExit) as e:
    cli.main(["evaluate", "--workdir", str(tmp_path), "--taus", "0.5,2"])
  assert e.value.code == 2 and "--taus" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_a_trained_smoke_workdir(tmp_path, synth_dir, capsys):
  """Train the smoke config briefly, then the real `evaluate`, `reproduce` and `predict`."""
  config = configuration.load_config("smoke")
  config.train.num_steps = 2
  config.train.eval_every_steps = 2
  w = tmp_path / "w"
  trainer.train_and_evaluate(config, str(w), data_dir=str(synth_dir))
  valid = engine.read_predictions_csv(w / trainer.VALIDATION_PREDICTIONS)
  index = evaluation.open_index(config, synth_dir)
  assert sorted(valid) == sorted(index.image_ids[r] for r in index.rows("valid"))
  assert cli.main(["evaluate", "--workdir", str(w), "--n-boot", "20", "--no-progress"]) == 0
  result = evaluation.load_evaluation(w / "evaluation_test.json")
  assert result["data_dir"] == str(synth_dir.resolve()) and result["step"] == 2
  assert (w / "evaluation_test_predictions.csv").is_file()
  out = tmp_path / "R"
  assert cli.main(["reproduce", "--run", f"r0=5:{w}", "--out", str(out), "--no-progress"]) == 0
  assert "reusing" in capsys.readouterr().err
  assert (out / "table3.md").is_file() and (out / "figure_levels.png").is_file()
  img = index.image_paths[index.rows("test")[0]]
  argv = ["predict", "--checkpoint", str(w), str(img), "--out", str(tmp_path / "P")]
  assert cli.main([*argv, "--no-progress"]) == 0
  # The same image through predict and through evaluate: the same probabilities.
  by_file = engine.read_predictions_csv(tmp_path / "P" / "predictions.csv")[img.name]
  by_split = engine.read_predictions_csv(w / "evaluation_test_predictions.csv")[img.name]
  np.testing.assert_allclose(by_file, by_split, atol=1e-5)
  _cross_source(w, tmp_path, capsys)


def _cross_source(w, tmp_path, capsys):
  """The NIH-trained workdir scored on a CheXpert-layout folder: exactly the mapped classes,
  each AUC over the images where its label is known; the run's own evaluation untouched."""
  own = (w / "evaluation_test.json").read_text()
  cx = tmp_path / "cx"
  assert cli.main(["synth", "--layout", "chexpert", "--out", str(cx), "--patients", "8",
                   "--size", "128"]) == 0  # fmt: skip
  capsys.readouterr()
  argv = ["evaluate", "--workdir", str(w), "--data-dir", str(cx), "--source", "chexpert"]
  assert cli.main([*argv, "--n-boot", "0", "--no-progress"]) == 0
  printed = capsys.readouterr().out
  assert (w / "evaluation_test.json").read_text() == own
  result = evaluation.load_evaluation(w / "evaluation_test_on_chexpert.json")
  pairs = [("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"),
           ("Effusion", "Pleural Effusion"), ("Pneumonia", "Pneumonia"),
           ("Pneumothorax", "Pneumothorax"), ("Consolidation", "Consolidation"),
           ("Edema", "Edema")]  # fmt: skip
  mapping = result["mapping"]
  assert [(p["model"], p["data"]) for p in mapping["pairs"]] == pairs
  assert (mapping["model_source"], mapping["source"]) == ("nih", "chexpert")
  assert set(mapping["model_only"]) == set(nih.CLASSES) - {m for m, _ in pairs}
  assert "Lung Opacity" in mapping["data_only"] and "Pleural Effusion" not in mapping["data_only"]
  assert list(result["auc"]) == [m for m, _ in pairs] and result["dice"] == {}
  assert "Effusion = Pleural Effusion (Pleural effusion)" in printed
  assert "left out (run classes without a counterpart): Infiltration, Mass" in printed
  # Each AUC by hand, over the test images whose label is known.
  index = pipeline.open_index(cx, source="chexpert")
  rows = index.rows("test")
  probs = engine.read_predictions_csv(w / result["predictions_file"])
  assert sorted(probs) == sorted(index.image_ids[r] for r in rows)
  for model_class, data_class in pairs:
    y = index.labels[rows, index.classes.index(data_class)]
    known = ~np.isnan(y)
    p = [probs[index.image_ids[r]][nih.CLASSES.index(model_class)] for r in rows[known]]
    want = classification.roc_auc(y[known], p)
    np.testing.assert_equal(result["auc"][model_class], want)
    assert (result.get("num_known") or {}).get(model_class, len(rows)) == known.sum()
  # RSNA's boxes of Lung Opacity are the localization truth of the run's Pneumonia.
  rs = tmp_path / "rs"
  assert cli.main(["synth", "--layout", "rsna-pneumonia", "--out", str(rs), "--patients", "10",
                   "--size", "128"]) == 0  # fmt: skip
  argv = ["evaluate", "--workdir", str(w), "--data-dir", str(rs), "--source", "rsna-pneumonia"]
  assert cli.main([*argv, "--n-boot", "0", "--no-progress"]) == 0
  result = evaluation.load_evaluation(w / "evaluation_test_on_rsna-pneumonia.json")
  assert [(p["model"], p["data"]) for p in result["mapping"]["pairs"]] == [
    ("Pneumonia", "Lung Opacity")]  # fmt: skip
  index = pipeline.open_index(rs, source="rsna-pneumonia")
  boxes = int(np.isin(index.box_rows, index.rows("test")).sum())
  assert boxes and result["num_boxes"] == {"Pneumonia": boxes} and list(result["dice"]) == [
    "Pneumonia"]  # fmt: skip
  assert math.isfinite(result["auc"]["Pneumonia"]) and "calibration" not in result


def test_non_finite_probability_or_map_names_the_image():
  index = types.SimpleNamespace(image_ids=("a.png", "b.png", "c.png"))
  probs = np.full((2, nih.NUM_CLASSES), 0.5, np.float32)
  ok = {2: np.zeros((4, 4, nih.NUM_CLASSES), np.float32)}
  evaluation.check_finite(
    index, types.SimpleNamespace(rows=np.array([0, 2]), probs=probs, saliency=ok), nih.CLASSES
  )
  probs[1, 3] = np.nan
  bad = types.SimpleNamespace(rows=np.array([0, 2]), probs=probs, saliency=ok)
  with pytest.raises(DataError, match=f"image c.png: the probability of {nih.CLASSES[3]} is nan"):
    evaluation.check_finite(index, bad, nih.CLASSES)
  probs[1, 3] = 0.5
  ok[2][1, 1, 0] = np.inf
  with pytest.raises(DataError, match="image c.png: its saliency map"):
    evaluation.check_finite(index, bad, nih.CLASSES)


def test_predictions_csv_with_a_nan_probability_names_the_image(tmp_path):
  text = engine.predictions_csv(["a.png", "b.png"], [1, 2], np.full((2, 3), 0.5), "xyz")
  path = tmp_path / "p.csv"
  path.write_text(text.replace("b.png,2,0.5", "b.png,2,nan"))
  with pytest.raises(DataError, match="p.csv: image b.png has a non-finite probability"):
    engine.read_predictions_csv(path)


def test_known_aucs_score_each_class_where_known():
  rng = np.random.default_rng(0)
  labels = (rng.random((60, 3)) < 0.4).astype(np.float64)
  probs, patients = rng.random((60, 3)), rng.integers(0, 20, 60)
  # Every label known: the very numbers of one call on the whole matrix, as before.
  auc, lo, hi = evaluation.known_aucs(labels, probs, patients, 50, 3)
  np.testing.assert_array_equal(auc, classification.per_class_auc(labels, probs))
  want = classification.bootstrap_auc_ci(labels, probs, patients, n_boot=50, seed=3)
  np.testing.assert_array_equal(np.stack([lo, hi]), np.stack(want))
  # A column with unknown labels: over its known images only; the others unchanged.
  labels[::3, 1] = np.nan
  auc2, lo2, _ = evaluation.known_aucs(labels, probs, patients, 50, 3)
  known = ~np.isnan(labels[:, 1])
  assert auc2[1] == classification.roc_auc(labels[known, 1], probs[known, 1])
  np.testing.assert_array_equal(auc2[[0, 2]], auc[[0, 2]])
  assert np.isfinite(lo2).all()


def test_scoring_of_names_a_model_class_met_twice():
  run = configuration.load_config("smoke")
  with run.unlocked():
    run.data.source, run.data.classes, run.model.num_classes = "rsna-pneumonia", ["Lung Opacity"], 1
  data = evaluation.data_config_of(run, "chexpert")
  assert data.data.source == "chexpert" and run.data.source == "rsna-pneumonia"
  got = evaluation.scoring_of(run, data, chexpert.LABELS)
  assert got.names == ("Lung Opacity / Lung Opacity", "Lung Opacity / Pneumonia")
  assert got.model_cols == (0, 0)
  assert got.data_cols == tuple(chexpert.LABELS.index(c) for c in ("Lung Opacity", "Pneumonia"))
  assert [p["finding"] for p in got.mapping["pairs"]] == ["Lung opacity", "Pneumonia"]
  assert evaluation.scoring_of(run, run, ["Lung Opacity"]).mapping is None
  with pytest.raises(DataError, match="no class of the rsna-pneumonia run"):
    evaluation.scoring_of(run, evaluation.data_config_of(run, "siim-acr"), ["Pneumothorax"])
