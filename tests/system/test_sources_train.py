"""Every source through the command line: `synth --layout S` -> `stats` -> `prepare --source S`
-> `train --source S` (smoke config, one step) -> `evaluate` -> `predict` on one of its raw
images (DICOM for RSNA, SIIM and VinDr), for every layout.

One module-level fixture per layout does the work once, calling `lsemil`'s `cli.main` in this
process (so the compiled programs are shared: the 14-class masked-loss step of CheXpert, csv,
MIMIC and VinDr, the 1-class one of RSNA and SIIM, NIH's own). The checks are against the
synthetic generator's own counts (lsemil_dataset.json's `expected`; `phantoms.plan` for NIH),
the raw folder's reader, and the source's class names in every file the commands write.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import types
import warnings
from collections import Counter

import ml_collections
import numpy as np
import pytest

from lsemil.commands import cli
from lsemil.data import findings, layouts, nih, phantoms, pipeline, siim
from lsemil.runtime import checkpointing

pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")

PATIENTS = 8  # SIIM-ACR's phantoms then include a mask
# A non-default policy, given to prepare and train alike and saved with the checkpoint.
POLICY = {"vindr-cxr": ("readers", "majority")}
STEP = ["--config.train.num_steps=1", "--config.train.eval_every_steps=1"]


def _run(*argv) -> str:
  """`lsemil *argv` in this process; its standard output."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(list(map(str, argv))) == 0, argv
  return out.getvalue()


def _expected_nih(patients: int) -> dict:
  """The NIH generator's counts: images, patients, test images and positives per class."""
  specs = phantoms.plan(patients, seed=0)
  counts = Counter(k for s in specs for k in s.classes)
  return {"images": len(specs), "patients": len({s.patient for s in specs}),
          "test_images": sum(s.split == "test" for s in specs),
          "classes": {c: {"positives": counts[k]} for k, c in enumerate(nih.CLASSES)}}


def _header(path) -> list[str]:
  with open(path, newline="") as f:
    return next(csv.reader(f))


@pytest.fixture(scope="module")
def cache_every_compile(fast_compiles):
  """Every program into the persistent cache: with fast compiles most take under the
  suite's 0.5 s threshold, and the seven layouts would compile each again."""
  import jax

  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old)


@pytest.fixture(scope="module", params=layouts.LAYOUTS)
def run(request, tmp_path_factory, cache_every_compile):
  layout = request.param
  root = tmp_path_factory.mktemp(layout)
  data, prepared, workdir, predicted = (root / n for n in ("data", "prepared", "w", "p"))
  size = 512 if layout == "nih" else 128  # the NIH layout's smallest
  _run("synth", "--layout", layout, "--out", data, "--patients", PATIENTS,
       "--size", size, "--workers", 1)
  marker = json.loads((data / nih.MARKER_NAME).read_text())
  policy = dict([POLICY[layout]]) if layout in POLICY else {}
  flags = [a for k, v in policy.items() for a in (f"--{k}", v)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the lateral views left out, noted
    stats = json.loads(_run("stats", "--source", layout, "--data-dir", data,
                            "--format", "json"))
    _run("prepare", "--source", layout, "--data-dir", data, "--out", prepared,
         "--size", 64, "--workers", 1, *flags)
    _run("train", "--config", "smoke", "--workdir", workdir, "--data-dir", prepared,
         "--source", layout, *STEP, *(f"--config.data.{k}={v}" for k, v in policy.items()))
    _run("evaluate", "--workdir", workdir, "--n-boot", 20, "--no-progress")
    raw = pipeline.open_index(data, source=layout, **policy)
    image = raw.image_paths[int(raw.rows("test")[0])]
    # threshold 1: no overlays (matplotlib's seconds), the table and CSV all the same
    _run("predict", "--checkpoint", workdir, "--out", predicted, "--threshold", 1,
         "--no-progress", image)
  expected = marker.get("expected") or _expected_nih(PATIENTS)
  return types.SimpleNamespace(layout=layout, data=data, prepared=prepared, workdir=workdir,
                               predicted=predicted, stats=stats, expected=expected, raw=raw,
                               image=image, policy=policy)


def test_stats_prints_the_generators_counts(run):
  expected, stats = run.expected, run.stats
  assert stats["images"]["all"] == expected["images"] > 0
  assert stats["patients"]["all"] == expected["patients"]
  assert stats["images"]["test"] > 0
  if "unknown" in next(iter(expected["classes"].values())):  # not NIH
    assert stats["source"] == run.layout and stats["missing"] == 0
    assert stats["mask_images"] == expected["mask_images"]
  if run.layout in ("nih", "chexpert", "mimic-cxr-jpg"):  # an official test split
    assert stats["images"]["test"] == expected["test_images"]
  assert list(stats["classes"]) == list(expected["classes"])
  for name, want in expected["classes"].items():
    row = stats["classes"][name]
    assert row["train"] + row["valid"] + row["test"] == want["positives"], name
    if "unknown" in want:
      assert (row["unknown"], row["boxes"]) == (want["unknown"], want["boxes"]), name


def test_prepare_keeps_the_sources_labels_split_boxes_and_masks(run):
  images, stats = run.stats["images"]["all"], run.stats
  marker = json.loads((run.prepared / nih.MARKER_NAME).read_text())
  assert marker["kind"] == "prepared" and marker["image_size"] == 64
  assert marker["classes"] == list(stats["classes"])
  raw = run.raw
  got = pipeline.open_index(run.prepared, source=run.layout, **run.policy)
  assert got.classes == raw.classes and got.image_ids == raw.image_ids and len(got) == images
  np.testing.assert_array_equal(got.labels, raw.labels)
  np.testing.assert_array_equal(got.splits, raw.splits)
  assert len(got.box_rows) == len(raw.box_rows)
  if not run.policy:  # stats counted under the default policies
    assert len(raw.box_rows) == sum(
      c.get("boxes", c.get("bbox", 0)) for c in stats["classes"].values())
  assert len(got.masks) == len(raw.masks) == stats.get("mask_images", 0)
  if run.layout == "siim-acr":  # the mask scaled with its image, 128 -> 64 px
    row = next(iter(got.masks))
    area = siim.mask(raw, raw.image_ids.index(got.image_ids[row])).sum()
    assert abs(siim.mask(got, row).sum() - area / 4) <= 0.1 * area / 4 + 8
  first = pipeline.open_source(run.prepared, "train", source=run.layout, **run.policy)[0]
  assert first["image"].shape == (64, 64) and first["labels"].shape == (len(got.classes),)
  if run.layout in ("chexpert", "mimic-cxr-jpg"):
    assert np.isnan(got.labels).any()  # U-Ignore: the uncertain labels are unknown


def test_train_evaluate_and_predict_write_the_sources_classes(run):
  classes = list(run.stats["classes"])
  assert classes == list(run.raw.classes)
  # train: the classes, their number, the split seed and the policies, with the checkpoint
  saved = checkpointing.step_configs(run.workdir)
  assert list(saved) == [1]
  config = ml_collections.ConfigDict(saved[1])
  assert list(findings.of_config(config)) == classes
  assert config.model.num_classes == len(classes)
  assert (config.data.source, config.data.split_seed) == (run.layout, 0)
  for name, value in run.policy.items():
    assert config.data[name] == value
  assert _header(run.workdir / "validation_predictions.csv")[2:] == classes
  # evaluate: every class of the source in the JSON, the CSV and the per-image predictions
  w = run.workdir
  result = json.loads((w / "evaluation_test.json").read_text())
  assert result["split"] == "test" and result["step"] == 1
  assert result["num_images"] == run.stats["images"]["test"]
  for key in ("auc", "num_positives"):
    assert list(result[key]) == classes, key
  with open(w / "evaluation_test.csv", newline="") as f:
    aucs = [r["class"] for r in csv.DictReader(f) if r["metric"] == "auc"]
  assert aucs == classes
  predictions = w / "evaluation_test_predictions.csv"
  assert _header(predictions)[2:] == classes
  with open(predictions, newline="") as f:
    assert sum(1 for _ in f) == 1 + result["num_images"]
  # predict: one raw image of the layout (PNG, JPEG or DICOM), its probabilities per class
  with open(run.predicted / "predictions.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0][2 : 2 + len(classes)] == classes and len(rows) == 2
  probs = np.array(rows[1][2 : 2 + len(classes)], float)
  assert np.all((probs > 0) & (probs < 1)), probs
  assert rows[1][rows[0].index("path")] == run.image
