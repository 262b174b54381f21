"""The ChestX-Det10 reader (lsemil.data.chestx_det10) on files in the release's format (the
first entries of its test.json, README.md's fields)."""

from __future__ import annotations

import json

import pytest

from lsemil.core.errors import DataError, DataWarning
from lsemil.data import sources

TRAIN = [
  {"file_name": "36199.png", "syms": [], "boxes": []},
  {"file_name": "36302.png", "syms": ["Effusion"], "boxes": [[799, 666, 937, 761]]},
]
TEST = [
  {"file_name": "36346.png", "syms": ["Effusion", "Fibrosis", "Effusion"],
   "boxes": [[90, 668, 217, 788], [699, 307, 774, 417], [133, 411, 329, 683]]},
]  # fmt: skip


def _folder(tmp_path, train=TRAIN, test=TEST):
  (tmp_path / "train.json").write_text(json.dumps(train))
  (tmp_path / "test.json").write_text(json.dumps(test))
  (tmp_path / "train_data").mkdir()
  (tmp_path / "train_data" / "36302.png").write_bytes(b"")
  return tmp_path


def test_boxes_labels_split(tmp_path):
  with pytest.warns(DataWarning, match="2 of 3 images have no file"):
    idx = sources.load("chestx-det10", _folder(tmp_path), val_fraction=0.0)
  assert idx.image_ids == ("36199.png", "36302.png", "36346.png")
  assert idx.splits.tolist() == ["train", "train", "test"] and idx.official_split
  eff, fib = idx.classes.index("Effusion"), idx.classes.index("Fibrosis")
  # eval.py counts both corners in: w = x2 - x1 + 1
  assert idx.boxes(1) == [(eff, (799.0, 666.0, 139.0, 96.0))]
  assert [k for k, _ in idx.boxes(2)] == [eff, fib, eff]
  assert idx.labels[2].sum() == 2 and idx.labels[0].sum() == 0
  assert idx.image_paths[1].endswith("train_data/36302.png")


@pytest.mark.parametrize(
  ("test", "match"),
  [
    (
      [{"file_name": "1.png", "syms": ["Flu"], "boxes": [[1, 1, 2, 2]]}],
      r"test\.json:#1: class 'Flu'",
    ),
    ([{"file_name": "1.png", "syms": ["Mass"], "boxes": []}], r"#1: 1 syms but 0 boxes"),
    ([TEST[0], {"file_name": "1.png", "syms": ["Mass"], "boxes": [[5, 1, 2, 2]]}], r"#2: box"),
    ([{"file_name": "1.png", "syms": ["Mass"], "boxes": [[1, 1, 2, 1024]]}], r"1024x1024"),
    ([{"file_name": "36302.png", "syms": [], "boxes": []}], r"#1: 36302.png is listed again"),
  ],
)
def test_bad_entries_name_file_and_position(tmp_path, test, match):
  with pytest.raises(DataError, match=match):
    sources.load("chestx-det10", _folder(tmp_path, test=test))
