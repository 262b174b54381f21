"""Tests of the NIH index and its splits (lsemil.data.nih; Table 1 is in
tests/unit/reporting/test_paper_tables.py).

Paper Section 4.1: the real-metadata numbers, the patient-wise splits, and the
errors raised on bad input (each naming the file and line).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil

import numpy as np
import pytest

from lsemil.commands import cli
from lsemil.core.errors import DataWarning
from lsemil.data.nih import (
  CLASSES,
  FALLBACK_TEST_FRACTION,
  VALID_FRACTION,
  DataError,
  load_index,
)


def _assert_patient_wise(index):
  owners = {}
  for pid, split in zip(index.patient_ids.tolist(), index.splits.tolist(), strict=True):
    assert owners.setdefault(pid, split) == split, f"patient {pid} in two splits"


# --------------------------------------------------------------------------- real metadata


def test_real_totals_and_official_split(nih):
  assert len(nih) == 112_120
  assert len(nih.patients()) == 30_805
  assert nih.official_split and nih.kind == "nih" and nih.box_space == 1024
  test = nih.splits == "test"
  assert int(test.sum()) == 25_596 and len(nih.patients("test")) == 2_797
  assert int((~test).sum()) == 86_524
  assert len(np.unique(nih.patient_ids[~test])) == 28_008
  assert not set(nih.patients("test")) & set(np.unique(nih.patient_ids[~test]))
  _assert_patient_wise(nih)


def test_real_validation_is_a_quarter_of_train_val_patients(nih):
  tv = len(nih.patients("train")) + len(nih.patients("valid"))
  assert len(nih.patients("valid")) == round(VALID_FRACTION * tv)


def test_real_test_positives_and_boxes(nih, nih_expected):
  assert nih.labels[nih.rows("test")].sum(axis=0).tolist() == nih_expected.test_positives
  assert len(nih.box_rows) == 984
  box_images = np.unique(nih.box_rows)
  assert len(box_images) == 880
  assert set(nih.splits[box_images].tolist()) == {"test"}
  counts = np.bincount(nih.box_classes, minlength=len(CLASSES))
  assert {CLASSES[k]: int(counts[k]) for k in range(8)} == nih_expected.boxes
  assert counts[8:].sum() == 0
  assert nih.warnings == ()


def test_real_index_is_immutable(nih):
  with pytest.raises(ValueError):
    nih.labels[0, 0] = 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    nih.kind = "x"
  assert nih.row(nih.image_ids[123]) == 123


def test_stats_cli(nih_metadata_dir, tmp_path, capsys):
  assert cli.main(["stats", "--nih-dir", str(nih_metadata_dir), "--format", "csv"]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0].startswith("abnormality,train,valid,test,bbox")
  assert len(out.splitlines()) == 1 + len(CLASSES)
  # A folder without the metadata: one line naming it, exit status 1.
  assert cli.main(["stats", "--nih-dir", str(tmp_path / "absent")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("lsemil stats: ") and "absent" in err[0]


# --------------------------------------------------------------------------- small tmp folders

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


def _entry(image_id: str, labels: str) -> str:
  pid = int(image_id[:8])
  return f"{image_id},{labels},{int(image_id[9:12])},{pid},40,M,PA,2500,2048,0.14,0.14"


ROWS = [
  ("00000001_000.png", "Cardiomegaly"),
  ("00000001_001.png", "Cardiomegaly|Emphysema"),
  ("00000002_000.png", "No Finding"),
  ("00000003_000.png", "Hernia"),
  ("00000004_000.png", "Infiltration|Nodule"),
  ("00000004_001.png", "No Finding"),
  ("00000005_000.png", "Pleural_Thickening"),
]
BOXES = ["00000004_000.png,Infiltrate,100.5,200.25,300,150", "00000004_001.png,Mass,1,2,3,4"]


def _write(tmp_path, rows=ROWS, boxes=BOXES[:1], train_val=None, test=None, gz=False, name="nih"):
  """A small NIH-layout folder; by default patients 1-3 are train_val and 4-5 test."""
  d = tmp_path / name
  d.mkdir(exist_ok=True)
  if train_val is None:
    train_val = [i for i, _ in rows if int(i[:8]) <= 3]
  if test is None:
    test = [i for i, _ in rows if int(i[:8]) > 3]
  files = {
    "Data_Entry_2017_v2020.csv": "\n".join([HEADER] + [_entry(i, lab) for i, lab in rows]) + "\n",
    "BBox_List_2017.csv": "\n".join([BBOX_HEADER] + boxes) + "\n",
    "train_val_list.txt": "\n".join(train_val),
    "test_list.txt": "\n".join(test),
  }
  for name, text in files.items():
    if gz:
      with gzip.open(d / (name + ".gz"), "wt", newline="") as f:
        f.write(text)
    else:
      (d / name).write_text(text)
  return d


def test_small_folder_loads(tmp_path):
  index = load_index(_write(tmp_path))
  assert index.image_ids == tuple(i for i, _ in ROWS)
  row = index.row("00000001_001.png")
  assert [CLASSES[k] for k in np.flatnonzero(index.labels[row])] == ["Cardiomegaly", "Emphysema"]
  assert index.labels[index.row("00000002_000.png")].sum() == 0
  # 'Infiltrate' in the box list is Infiltration; coordinates are kept as written.
  assert index.boxes(index.row("00000004_000.png")) == [
    (CLASSES.index("Infiltration"), (100.5, 200.25, 300.0, 150.0))
  ]
  assert set(index.splits[[index.row("00000004_000.png"), index.row("00000005_000.png")]]) == {
    "test"}
  _assert_patient_wise(index)
  assert index.image_paths == (None,) * len(ROWS)


def test_gzipped_folder_reads_the_same(tmp_path):
  plain = load_index(_write(tmp_path, name="plain"))
  packed = load_index(_write(tmp_path, name="packed", gz=True))
  assert all(p.suffix == ".gz" for p in (tmp_path / "packed").iterdir())
  assert plain.image_ids == packed.image_ids
  np.testing.assert_array_equal(plain.labels, packed.labels)
  np.testing.assert_array_equal(plain.splits, packed.splits)
  np.testing.assert_array_equal(plain.box_xywh, packed.box_xywh)


def test_images_found_in_archive_folders(tmp_path):
  d = _write(tmp_path)
  (d / "images_001" / "images").mkdir(parents=True)
  (d / "images").mkdir()
  (d / "images_001" / "images" / "00000001_000.png").write_bytes(b"png")
  (d / "images" / "00000002_000.png").write_bytes(b"png")
  with pytest.warns(DataWarning, match="5 images"):
    index = load_index(d)
  assert index.image_paths[0] == d / "images_001" / "images" / "00000001_000.png"
  assert index.image_paths[2] == d / "images" / "00000002_000.png"
  assert sum(p is not None for p in index.image_paths) == 2


def _patients_of(n):
  return [(f"{p:08d}_{k:03d}.png", "No Finding") for p in range(1, n + 1) for k in range(p % 3 + 1)]


def test_validation_split_is_patient_wise_and_seeded(tmp_path):
  rows = _patients_of(200)
  d = _write(tmp_path, rows=rows, boxes=[], train_val=[i for i, _ in rows if int(i[:8]) <= 160],
             test=[i for i, _ in rows if int(i[:8]) > 160])
  a, b, c = load_index(d, seed=0), load_index(d, seed=0), load_index(d, seed=1)
  np.testing.assert_array_equal(a.splits, b.splits)
  assert not np.array_equal(a.splits, c.splits)
  for index in (a, c):
    _assert_patient_wise(index)
    assert len(index.patients("valid")) == 40 and len(index.patients("test")) == 40


def test_fallback_split_without_lists(tmp_path):
  rows = _patients_of(100)
  d = _write(tmp_path, rows=rows, boxes=[])
  (d / "train_val_list.txt").unlink()
  (d / "test_list.txt").unlink()
  index = load_index(d, seed=3)
  assert not index.official_split
  _assert_patient_wise(index)
  assert len(index.patients("test")) == round(FALLBACK_TEST_FRACTION * 100)
  assert len(index.patients("valid")) == round(VALID_FRACTION * 80)
  np.testing.assert_array_equal(index.splits, load_index(d, seed=3).splits)


def test_box_for_an_unlabelled_class_is_a_counted_warning(tmp_path):
  d = _write(tmp_path, boxes=BOXES)
  with pytest.warns(DataWarning, match=r"1 boxes name a class") as rec:
    index = load_index(d)
  assert len(index.box_rows) == 2 and any("1 boxes name" in w for w in index.warnings)
  assert len(rec) == 1


def _expect(d, name, line, *words):
  with pytest.raises(DataError) as e:
    load_index(d)
  msg = str(e.value)
  assert re.search(rf"{re.escape(name)}(\.gz)?:{line}\b", msg), msg
  for w in words:
    assert w in msg, msg


def _edit(d, name, fn):
  path = d / name
  path.write_text(fn(path.read_text()))


@pytest.mark.parametrize("gz", [False, True])
def test_unknown_label(tmp_path, gz):
  rows = list(ROWS)
  rows[3] = ("00000003_000.png", "Hernia|Pneumonitis")
  _expect(_write(tmp_path, rows=rows, gz=gz), "Data_Entry_2017_v2020.csv", 5, "Pneumonitis")


def test_no_finding_with_findings(tmp_path):
  rows = list(ROWS)
  rows[2] = ("00000002_000.png", "No Finding|Mass")
  _expect(_write(tmp_path, rows=rows), "Data_Entry_2017_v2020.csv", 4, "No Finding")


def test_duplicate_id(tmp_path):
  rows = ROWS + [ROWS[1]]
  _expect(_write(tmp_path, rows=rows), "Data_Entry_2017_v2020.csv", 9, "duplicate", "line 3")


_ENTRY, _BBOX = "Data_Entry_2017_v2020.csv", "BBox_List_2017.csv"
# (file, old text, new text, the line the error names, words in the error)
_MALFORMED = [
  (_ENTRY, _entry(*ROWS[4]), "00000004_000.png", 6, ["malformed"]),
  (_ENTRY, ",5,40,M", ",five,40,M", 8, ["Patient ID", "five"]),
  (_ENTRY, ",3,40,M", ",33,40,M", 5, ["does not match"]),
  (_ENTRY, "Patient ID", "Patient", 1, ["Patient ID"]),
  (_BBOX, BBOX_HEADER, "Image Index,Finding Label", 1, ["expected header"]),
  (_BBOX, ",300,150", ",300", 2, ["malformed"]),
  (_BBOX, "300,150", "300,wide", 2, ["not numbers"]),
]


def test_malformed_rows(tmp_path):
  for name, old, new, line, words in _MALFORMED:
    d = _write(tmp_path)
    _edit(d, name, lambda t, old=old, new=new: t.replace(old, new))
    _expect(d, name, line, *words)


def test_box_errors(tmp_path):
  d = _write(tmp_path, boxes=[BOXES[0], "00000001_000.png,Cardiomegaly,900,10,200,50"])
  _expect(d, "BBox_List_2017.csv", 3, "outside", "1024")
  d = _write(tmp_path, boxes=[BOXES[0], "00000001_000.png,Cardiomegaly,-1,10,20,50"])
  _expect(d, "BBox_List_2017.csv", 3, "outside")
  d = _write(tmp_path, boxes=["00000001_000.png,Heart,1,10,20,50"])
  _expect(d, "BBox_List_2017.csv", 2, "Heart")
  d = _write(tmp_path, boxes=[BOXES[0], "00000099_000.png,Mass,1,10,20,50"])
  _expect(d, "BBox_List_2017.csv", 3, "00000099_000.png")


def test_box_space_from_marker(tmp_path):
  d = _write(tmp_path, boxes=["00000004_000.png,Nodule,400,400,100,100"])
  load_index(d)  # inside 1024
  (d / "lsemil_dataset.json").write_text(json.dumps({"kind": "synthetic", "box_space": 256}))
  _expect(d, "BBox_List_2017.csv", 2, "256x256")


def test_list_errors(tmp_path):
  tv = [i for i, _ in ROWS if i[:8] in ("00000001", "00000002", "00000003")]
  test = [i for i, _ in ROWS if i[:8] in ("00000004", "00000005")]
  d = _write(tmp_path, train_val=tv + ["00000077_000.png"], test=test)
  _expect(d, "train_val_list.txt", 5, "00000077_000.png", "not in")
  d = _write(tmp_path, train_val=tv, test=test + [tv[0]])
  _expect(d, "test_list.txt", 4, "also listed", "train_val_list.txt:1")
  d = _write(tmp_path, train_val=tv[1:], test=test)
  _expect(d, "Data_Entry_2017_v2020.csv", 2, "neither")
  d = _write(tmp_path, train_val=tv + [test[0]], test=test[1:])
  with pytest.raises(DataError, match="patient 4 is in both splits"):
    load_index(d)
  d = _write(tmp_path, train_val=tv, test=test)
  (d / "test_list.txt").unlink()
  with pytest.raises(DataError, match="test_list.txt"):
    load_index(d)


def test_missing_folder_and_csv(tmp_path):
  with pytest.raises(DataError, match="not a folder"):
    load_index(tmp_path / "absent")
  d = _write(tmp_path)
  shutil.move(d / "Data_Entry_2017_v2020.csv", d / "other.csv")
  with pytest.raises(DataError, match="Data_Entry_2017"):
    load_index(d)


def test_real_validation_fraction_is_configurable(nih_metadata_dir):
  index = load_index(nih_metadata_dir, val_fraction=0.1)
  train_val = np.unique(index.patient_ids[index.splits != "test"])
  valid = np.unique(index.patient_ids[index.splits == "valid"])
  assert len(valid) == round(0.1 * len(train_val))
  assert not np.intersect1d(valid, index.patient_ids[index.splits == "train"]).size
  with pytest.raises(DataError, match="val_fraction"):
    load_index(nih_metadata_dir, val_fraction=1.0)
