"""Every source through the command line: `synth --layout S` -> `stats` -> `prepare --source S`
-> `train --source S` (smoke config, one step) for a representative subset.

One module-level fixture per layout does the work once; the checks are against the synthetic
generator's own counts (lsemil_dataset.json's `expected`; `phantoms.plan` for NIH), the raw
folder's reader, and the class names saved in the checkpoint's config.
"""

from __future__ import annotations

import contextlib
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
# Trained: CheXpert under U-Ignore (unknown labels, the masked loss, 14 classes) and SIIM-ACR
# (one class, DICOM, masks); the other layouts are synthesized, counted and prepared.
TRAIN = {"chexpert": ["--config.data.uncertain=ignore"], "siim-acr": []}
STEP = ["--config.train.num_steps=1", "--config.train.eval_every_steps=1",
        "--config.train.batch_size=4", "--config.train.eval_batch_size=16"]


def _run(*argv) -> str:
  """`lsemil *argv` in this process; its standard output."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(list(map(str, argv))) == 0, argv
  return out.getvalue()


def _expected_nih(patients: int) -> dict:
  """The NIH generator's counts: images and positives per class, from its plan."""
  specs = phantoms.plan(patients, seed=0)
  counts = Counter(k for s in specs for k in s.classes)
  return {"images": len(specs),
          "classes": {c: {"positives": counts[k]} for k, c in enumerate(nih.CLASSES)}}


@pytest.fixture(scope="module", params=layouts.LAYOUTS)
def run(request, tmp_path_factory):
  layout = request.param
  root = tmp_path_factory.mktemp(layout)
  data, prepared, workdir = root / "data", root / "prepared", root / "w"
  size = 512 if layout == "nih" else 128  # the NIH layout's smallest
  _run("synth", "--layout", layout, "--out", data, "--patients", PATIENTS,
       "--size", size, "--workers", 1)
  marker = json.loads((data / nih.MARKER_NAME).read_text())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the lateral views left out, noted
    stats = json.loads(_run("stats", "--source", layout, "--data-dir", data,
                            "--format", "json"))
    _run("prepare", "--source", layout, "--data-dir", data, "--out", prepared,
         "--size", 64, "--workers", 1, "--uncertain", "ignore")
    if layout in TRAIN:
      _run("train", "--config", "smoke", "--workdir", workdir, "--data-dir",
           prepared, "--source", layout, *STEP, *TRAIN[layout])
  expected = marker.get("expected") or _expected_nih(PATIENTS)
  return types.SimpleNamespace(layout=layout, data=data, prepared=prepared, workdir=workdir,
                               stats=stats, expected=expected)


def test_every_layout_is_counted_prepared_and_trained_through_the_cli(run):
  expected, stats = run.expected, run.stats
  images = stats["images"]["all"]
  assert images == expected["images"] > 0
  for name, want in expected["classes"].items():
    row = stats["classes"][name]
    assert row["train"] + row["valid"] + row["test"] == want["positives"], name
  # prepare: the source's classes, its label matrix (NaN kept) and split, 64 px images
  marker = json.loads((run.prepared / nih.MARKER_NAME).read_text())
  assert marker["kind"] == "prepared" and marker["image_size"] == 64
  assert marker["classes"] == list(stats["classes"])
  raw = pipeline.open_index(run.data, source=run.layout)
  got = pipeline.open_index(run.prepared, source=run.layout)
  assert got.classes == raw.classes and got.image_ids == raw.image_ids and len(got) == images
  np.testing.assert_array_equal(got.labels, raw.labels)
  np.testing.assert_array_equal(got.splits, raw.splits)
  assert len(got.box_rows) == len(raw.box_rows) == sum(
    c.get("boxes", c.get("bbox", 0)) for c in stats["classes"].values())
  assert len(got.masks) == len(raw.masks) == stats.get("mask_images", 0)
  if run.layout == "siim-acr":  # the mask scaled with its image, 128 -> 64 px
    row = next(iter(got.masks))
    area = siim.mask(raw, raw.image_ids.index(got.image_ids[row])).sum()
    assert abs(siim.mask(got, row).sum() - area / 4) <= 0.1 * area / 4 + 8
  first = pipeline.open_source(run.prepared, "train", source=run.layout)[0]
  assert first["image"].shape == (64, 64) and first["labels"].shape == (len(got.classes),)
  if run.layout == "chexpert":
    assert np.isnan(got.labels).any()  # U-Ignore: the uncertain labels are unknown
  if run.layout not in TRAIN:
    return
  # train: the classes and their number are saved with the checkpoint, with the split seed
  saved = checkpointing.step_configs(run.workdir)
  assert list(saved) == [1]
  config = ml_collections.ConfigDict(saved[1])
  assert findings.of_config(config) == got.classes
  assert config.model.num_classes == len(got.classes)
  assert (config.data.source, config.data.split_seed) == (run.layout, 0)
  header = (run.workdir / "validation_predictions.csv").read_text().splitlines()[0]
  assert header.split(",")[2:] == list(got.classes)
