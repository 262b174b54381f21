"""Synthetic layouts (lsemil.data.layouts): refusals, and SIIM masks that are the planted boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lsemil.commands import cli
from lsemil.core.errors import DataError
from lsemil.data import layouts, nih, phantoms, siim, sources


def test_refusals(tmp_path, capsys):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(DataError, match="is not empty"):
    layouts.write("csv", tmp_path / "full", patients=1, size=128)
  with pytest.raises(DataError, match="unknown layout 'padchest'"):
    layouts.write("padchest", tmp_path / "new", patients=1, size=128)
  with pytest.raises(SystemExit):  # the NIH layout keeps its sizes: a usage error
    cli.main(["synth", "--out", str(tmp_path / "nih"), "--size", "128"])
  assert "the nih layout takes 512 or 1024" in capsys.readouterr().err


def test_siim_masks_are_the_planted_pneumothorax_boxes(tmp_path):
  pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
  marker = layouts.write("siim-acr", tmp_path / "s", patients=8, size=128)
  idx = sources.load("siim-acr", tmp_path / "s")
  assert json.loads((tmp_path / "s" / "lsemil_dataset.json").read_text()) == marker
  ptx = nih.CLASSES.index("Pneumothorax")
  specs = [s for s in phantoms.plan(8, 0) if ptx in s.classes]
  assert len(idx.masks) == len(specs) > 0
  for spec in specs:
    _, boxes = phantoms.render_image(spec, size=128, seed=0, pixels=False)
    x, y, w, h = boxes[ptx]
    suffix = f".{spec.patient}.{spec.follow_up}"
    row = next(r for r in idx.masks if idx.image_ids[r].endswith(suffix))
    want = np.zeros((128, 128), bool)
    want[y : y + h, x : x + w] = True
    np.testing.assert_array_equal(siim.mask(idx, row), want)
    assert len(idx.masks[row][0]) == (2 if w >= 2 else 1)  # two components, united
