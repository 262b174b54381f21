"""The MIMIC-CXR-JPG reader (lsemil.data.mimic) on a small synthetic release."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest

from lsemil.core.errors import DataError
from lsemil.data import layouts, mimic, sources


@pytest.fixture
def release(tmp_path):
  layouts.write("mimic-cxr-jpg", tmp_path / "m", patients=3, size=128)
  return tmp_path / "m"


def _lines(root, name):
  return gzip.decompress((root / f"{name}.gz").read_bytes()).decode().splitlines()


def _rewrite(root, name, lines):
  (root / f"{name}.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def _load(root, **options):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    idx = sources.load("mimic-cxr-jpg", root, **options)
  return idx, [str(w.message) for w in caught]


def test_official_split_paths_and_views(release):
  frontal, _ = _load(release)
  every, notes = _load(release, views="all")
  split = _lines(release, mimic.SPLIT_NAME)[1:]
  assert len(every) == len(split) > len(frontal) and not notes
  assert frontal.official_split and set(frontal.splits) <= {"train", "valid", "test"}
  dicom, study, subject, _ = split[0].split(",")
  want = release / f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
  assert every.image_paths[0] == str(want)
  assert not every.missing


def test_a_study_without_labels_is_unknown_and_noted(release):
  lines = _lines(release, mimic.LABELS_NAME)
  _rewrite(release, mimic.LABELS_NAME, lines[:-1])
  idx, notes = _load(release)
  assert any("belong to studies without a row" in n for n in notes)
  assert np.isnan(idx.labels).all(axis=1).any()


def test_an_image_missing_from_the_metadata_names_the_split_line(release):
  lines = _lines(release, mimic.METADATA_NAME)
  _rewrite(release, mimic.METADATA_NAME, lines[:1] + lines[2:])
  with pytest.raises(DataError, match=r"split\.csv\.gz:2: image .* is not in .*metadata"):
    _load(release)


def test_an_unknown_class_column_names_the_header(release):
  lines = _lines(release, mimic.LABELS_NAME)
  _rewrite(release, mimic.LABELS_NAME, [lines[0].replace("Edema", "Oedema"), *lines[1:]])
  with pytest.raises(DataError, match=r"chexpert\.csv\.gz:1: .*\(unknown: Oedema\)"):
    _load(release)
