"""The generic CSV source (lsemil.data.catalog): labels.csv and boxes.csv."""

from __future__ import annotations

import math

import pytest

from lsemil.core.errors import DataError, DataWarning
from lsemil.data import sources

LABELS = "path,patient,Mass,Nodule\na.png,p1,1,-1\nb.png,p1,0,\nc.dcm,p2,,1\nd.jpg,p3,0,0\n"


def test_labels_boxes_and_a_patient_wise_split(tmp_path):
  (tmp_path / "labels.csv").write_text(LABELS)
  (tmp_path / "boxes.csv").write_text("path,class,x,y,w,h\na.png,Mass,1,2,30,40\n")
  (tmp_path / "a.png").write_bytes(b"x")
  with pytest.warns(DataWarning, match=r"3 of 4 images have no file \(b\.png, c\.dcm, d\.jpg\)"):
    idx = sources.load("csv", tmp_path, blank="ignore")
  assert idx.classes == ("Mass", "Nodule") and not idx.official_split
  assert math.isnan(idx.labels[0, 1]) and math.isnan(idx.labels[1, 1])
  assert idx.labels[2, 1] == 1 and math.isnan(idx.labels[2, 0])
  assert idx.boxes(0) == [(0, (1.0, 2.0, 30.0, 40.0))]
  assert idx.splits[0] == idx.splits[1]


@pytest.mark.parametrize(("labels", "boxes", "match"), [
  (LABELS + "a.png,p4,0,0\n", None, r"labels\.csv:6: duplicate path a\.png \(first at .*:2\)"),
  ("path,patient,split,Mass\na.png,p1,train,1\nb.png,p1,test,0\n", None,
   r"labels\.csv:3: patient p1 is in split test here and in train at .*labels\.csv:2"),
  ("path,patient,split,Mass\na.png,p1,dev,1\n", None, r"labels\.csv:2: split 'dev'"),
  (LABELS, "path,class,x,y,w,h\na.png,Edema,1,2,3,4\n", r"boxes\.csv:2: unknown class 'Edema'"),
  (LABELS, "path,class,x,y,w,h\nz.png,Mass,1,2,3,4\n", r"boxes\.csv:2: image 'z\.png' is not"),
  (LABELS, "path,class,x,y,w,h\na.png,Mass,1,2,0,4\n", r"boxes\.csv:2: degenerate box"),
  (LABELS, "path,class,x,y,w,h\na.png,Mass,-1,2,3,4\n", r"boxes\.csv:2: box .* off the image"),
])
def test_bad_rows_name_file_and_line(tmp_path, labels, boxes, match):
  (tmp_path / "labels.csv").write_text(labels)
  if boxes:
    (tmp_path / "boxes.csv").write_text(boxes)
  with pytest.raises(DataError, match=match):
    sources.load("csv", tmp_path)


def test_a_split_column_is_the_official_split(tmp_path):
  (tmp_path / "labels.csv").write_text(
    "path,patient,split,Mass\na.png,p1,test,1\nb.png,p2,valid,0\nc.png,p2,valid,-1\n")
  with pytest.warns(DataWarning, match="3 of 3 images have no file"):
    idx = sources.load("csv", tmp_path, uncertain="ones")
  assert idx.official_split and idx.splits.tolist() == ["test", "valid", "valid"]
  assert idx.labels[:, 0].tolist() == [1, 0, 1]
