"""SIIM-ACR (lsemil.data.siim): the competition's run-length code and the reader."""

from __future__ import annotations

import numpy as np
import pytest

from lsemil.core.errors import DataError, DataWarning
from lsemil.data import siim, sources


def test_a_hand_written_code_decodes_column_major_with_relative_starts():
  # 3 rows x 4 columns; pixels are numbered down each column: (r, c) -> c * 3 + r.
  # "1 2 3 1": pixels 1, 2 (column 0, rows 1-2), then 3 past the run's end (pixel 3) -> 6.
  got = siim.decode_rle("1 2 3 1", height=3, width=4)
  want = np.zeros((3, 4), bool)
  want[1, 0] = want[2, 0] = want[0, 2] = True
  np.testing.assert_array_equal(got, want)
  assert siim.encode_rle(want) == "1 2 3 1"
  assert siim.encode_rle(np.zeros((3, 4), bool)) == "-1"
  assert not siim.decode_rle("-1", 3, 4).any()


def test_random_masks_round_trip_exactly():
  rng = np.random.default_rng(0)
  for shape in ((5, 7), (16, 16), (32, 9)):
    for p in (0.05, 0.5, 0.95):
      m = rng.random(shape) < p
      m[-1, -1] = True  # a run that reaches the last pixel
      np.testing.assert_array_equal(siim.decode_rle(siim.encode_rle(m), *shape), m)


@pytest.mark.parametrize(("code", "match"), [
  ("1 2 3", "3 numbers"), ("1 x", "not whitespace-separated integers"), ("0 0", "length below 1"),
  ("10 3", "past the image's 12"),
])
def test_bad_codes(code, match):
  with pytest.raises(ValueError, match=match):
    siim.decode_rle(code, 3, 4)


def _folder(tmp_path, rows):
  (tmp_path / "lsemil_dataset.json").write_text('{"image_size": 4}')
  (tmp_path / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "\n".join(rows) + "\n")
  nested = tmp_path / "dicom-images-train" / "1.2" / "1.3"
  nested.mkdir(parents=True)
  (nested / "b.dcm").write_bytes(b"")
  return tmp_path


def test_components_are_united_and_missing_images_named(tmp_path):
  root = _folder(tmp_path, ["a, -1", "b, 0 2", "b, 8 1", "c, -1"])
  with pytest.warns(DataWarning, match=r"2 of 3 images have no file \(a, c\)"):
    idx = sources.load("siim-acr", root)
  assert idx.classes == ("Pneumothorax",) and idx.labels[:, 0].tolist() == [0, 1, 0]
  assert idx.image_paths[1] == str(root / "dicom-images-train/1.2/1.3/b.dcm")
  want = np.zeros((4, 4), bool)
  want[0:2, 0] = True
  want[0, 2] = True  # each component counts from pixel 0: 8 -> column 2, row 0
  np.testing.assert_array_equal(siim.mask(idx, 1), want)


@pytest.mark.parametrize(("rows", "match"), [
  (["a, -1", "a, 1 2"], r"train-rle\.csv:3: a has -1 and a mask \(see .*:2\)"),
  (["a, 1 2", "a, 1 2"], r"train-rle\.csv:3: duplicate row, the same as .*:2"),
  (["a, 15 2"], r"train-rle\.csv:2: EncodedPixels of a: its runs end at pixel 17, past"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, match):
  with pytest.raises(DataError, match=match):
    sources.load("siim-acr", _folder(tmp_path, rows))
