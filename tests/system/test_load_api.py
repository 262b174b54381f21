"""`lsemil.load(PATH).predict(images)` against `lsemil predict --boxes` on the same files.

An export folder of a smoke model with random weights (no training), per-class operating
points and a temperature fit. The same two files (a non-square grey PNG and a colour PNG) go through
`lsemil predict --boxes` and through `lsemil.load(export).predict`: the same float32
probabilities bit for bit (the same reading, `engine.Predictor` and batch of 16), the same
decisions, calibrated probabilities and boxes. Arrays and PIL images of the same pixels give
the same as the paths. README's first Python block runs verbatim on this export.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from PIL import Image

import lsemil
from lsemil.commands import cli
from lsemil.core import configuration
from lsemil.core.errors import ImageError
from lsemil.data.nih import CLASSES
from lsemil.models import registry
from lsemil.runtime import bundle
from lsemil.workflows import release

pytestmark = pytest.mark.usefixtures("fast_compiles")

ROOT = Path(__file__).resolve().parents[2]
STEP = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_variables, phantom_image):
  """An export folder as `lsemil export` writes it (`bundle.write`, thresholds.json with a
  class left without a threshold, calibration.json), written directly: no orbax round trip
  (tests/unit/workflows/test_release.py exports through the CLI); two image files."""
  tmp = tmp_path_factory.mktemp("load_api")
  config = configuration.load_config("smoke")
  out = tmp / "export"
  variables = random_variables(registry.from_config(config.model), seed=5)
  bundle.write(out, config, variables, step=STEP, source="test", version=lsemil.__version__)
  thresholds = [0.5 + 0.001 * (k - 7) for k in range(len(CLASSES))]
  thresholds[3] = None  # a class without an operating point
  ops = {"rule": "spec=0.9", "fit_split": "valid", "classes": list(CLASSES),
         "thresholds": thresholds}  # fmt: skip
  (out / release.THRESHOLDS_FILE).write_text(json.dumps(ops))
  cal = {"method": "temperature", "classes": list(CLASSES), "temperature": [1.5] * len(CLASSES)}
  (out / release.CALIBRATION_FILE).write_text(json.dumps(cal))
  grey = cv2.resize(phantom_image(1, 600), (600, 480))  # not square, above 512 px
  colour = np.stack([phantom_image(s, 200) for s in (2, 3, 4)], axis=-1)  # BGR, as cv2 writes
  files = [tmp / "grey.png", tmp / "colour.png"]
  assert cv2.imwrite(str(files[0]), grey) and cv2.imwrite(str(files[1]), colour)
  return SimpleNamespace(out=out, files=files, model=lsemil.load(out), tmp=tmp)


def test_predict_matches_the_cli(run, tmp_path, capsys):
  model = run.model
  got = model.predict([str(p) for p in run.files])
  assert [g.source for g in got] == [str(p) for p in run.files]
  assert got[0].image_size == (480, 600) and got[1].image_size == (200, 200)
  # a threshold between the first file's 2nd and 3rd most probable class: some boxes, few overlays
  threshold = float(np.mean([p for _, p in got[0].top(3)[1:]]))
  got = model.predict(run.files, threshold=threshold)
  argv = ["predict", "--checkpoint", str(run.out), *map(str, run.files), "--out", str(tmp_path),
          "--boxes", "--no-progress", "--threshold", repr(threshold)]  # fmt: skip
  assert cli.main(argv) == 0
  assert "decisions: p >= per-class thresholds (spec=0.9 rule" in capsys.readouterr().err
  rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
  boxes = json.loads((tmp_path / "boxes.json").read_text())
  for row, g, path in zip(rows, got, run.files, strict=True):
    want = np.array([float(row[c]) for c in CLASSES], np.float32)
    np.testing.assert_array_equal(np.array([g.probs[c] for c in CLASSES], np.float32), want)
    assert [g.decisions[c] for c in CLASSES] == [
      None if row[f"{c}_decision"] == "" else row[f"{c}_decision"] == "1" for c in CLASSES
    ]
    calibrated = [float(row[f"{c}_calibrated"]) for c in CLASSES]
    np.testing.assert_allclose([g.calibrated[c] for c in CLASSES], calibrated, rtol=1e-8)
    assert g.boxes == boxes[path.name]
  assert sum(len(b) for g in got for b in g.boxes.values()) > 0
  assert got[0].rule == "spec=0.9 (valid split)" and got[0].decisions[CLASSES[3]] is None
  assert np.ptp(list(got[0].probs.values())) > 1e-3  # 14 different numbers


def test_arrays_and_pil_images_equal_their_files(run):
  model = run.model
  from_paths = model.predict(run.files)
  grey = cv2.imread(str(run.files[0]), cv2.IMREAD_UNCHANGED)
  rgb = cv2.cvtColor(cv2.imread(str(run.files[1]), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
  inputs = {
    "arrays": [grey, rgb],
    "PIL": [Image.open(run.files[0]), Image.open(run.files[1])],
    "float": [grey / 255.0, rgb.astype(np.float32) / 255],
  }
  for kind, images in inputs.items():
    got = model.predict(images)
    for g, want in zip(got, from_paths, strict=True):
      assert g.probs == want.probs and g.boxes == want.boxes and g.decisions == want.decisions, kind
      np.testing.assert_array_equal(g.saliency, want.saliency)
  single = model.predict(grey)  # one image -> one Prediction (a batch of 1: XLA may round the
  assert single.source == "<array 0>"  # last bit otherwise than in a batch of 2)
  assert single.probs == model.predict(run.files[0]).probs
  big = single.saliency_map(CLASSES[0])
  assert big.shape == (480, 600) and big.dtype == np.float32
  n = single.saliency.shape[0]  # nearest neighbour over the whole image: block corners agree
  assert big[0, 0] == single.saliency[0, 0, 0] and big[-1, -1] == single.saliency[n - 1, n - 1, 0]
  with pytest.raises(ImageError, match="missing.png"):
    model.predict(run.tmp / "missing.png")
  with pytest.raises(ImageError, match=r"<array 0>: a float image must hold values in \[0, 1\]"):
    model.predict([grey.astype(np.float32)])


def test_readme_first_python_block_runs_verbatim(run, tmp_path, monkeypatch, capsys):
  """README's first Python block (import, load, predict on a file path), in a folder holding
  the demo's names: this export and a PNG."""
  block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
  code = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
  assert len(code) == 3 and code[0] == "import lsemil", block
  demo = tmp_path / "lsemil_demo"
  (demo / "nih" / "images").mkdir(parents=True)
  os.symlink(run.out, demo / "export_r05")
  image = cv2.imread(str(run.files[0]), cv2.IMREAD_UNCHANGED)
  assert cv2.imwrite(str(demo / "nih" / "images" / "00000001_000.png"), image)
  monkeypatch.chdir(tmp_path)
  space = {}
  exec(compile(block, "README.md", "exec"), space)
  result = space["result"]
  assert isinstance(result, lsemil.inference.trained_model.Prediction)
  assert result.probs == run.model.predict(run.files[0]).probs
