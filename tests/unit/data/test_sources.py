"""The source registry (lsemil.data.sources): the `nih` source is `nih.load_index` unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from lsemil.core.errors import DataError
from lsemil.data import nih, sources


def _assert_same(src, idx):
  assert src.source == "nih" and src.classes == nih.CLASSES
  assert src.image_ids == idx.image_ids
  assert src.patient_ids.tolist() == [str(p) for p in idx.patient_ids.tolist()]
  assert src.splits.tolist() == idx.splits.tolist()
  np.testing.assert_array_equal(src.labels, idx.labels.astype(np.float32))
  np.testing.assert_array_equal(src.box_rows, idx.box_rows)
  np.testing.assert_array_equal(src.box_classes, idx.box_classes)
  np.testing.assert_array_equal(src.box_xywh, idx.box_xywh)
  assert src.official_split == idx.official_split and src.warnings == idx.warnings
  missing = set(src.missing)
  assert [str(p) for p in idx.image_paths if p is not None] == [
    p for i, p in zip(src.image_ids, src.image_paths, strict=True) if i not in missing]


def test_nih_source_equals_the_nih_index_on_a_small_folder(tmp_path, write_nih_folder):
  write_nih_folder(tmp_path, patients=4, per_patient=2, size=64)
  for seed in (0, 1):
    _assert_same(sources.load("nih", tmp_path, seed=seed), nih.load_index(tmp_path, seed=seed))


def test_nih_source_equals_the_nih_index_on_the_real_metadata(nih):
  _assert_same(sources.from_nih(nih), nih)


def test_unknown_source_and_missing_folder(tmp_path):
  with pytest.raises(DataError, match="unknown source 'padchest'; expected one of nih, chexpert"):
    sources.load("padchest", tmp_path)
  with pytest.raises(DataError, match="not a folder"):
    sources.load("csv", tmp_path / "absent")
