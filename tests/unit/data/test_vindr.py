"""The VinDr-CXR reader (lsemil.data.vindr): the PhysioNet release and the competition CSV."""

from __future__ import annotations

import pytest

from lsemil.core.errors import DataError, DataWarning
from lsemil.data import sources, vindr

TRAIN = """image_id,rad_id,Aortic enlargement,Atelectasis,No finding
a,R1,1,0,0
a,R2,1,1,0
a,R3,0,0,1
b,R1,0,0,1
"""
TEST = "image_id,Aortic enlargement,Atelectasis,No finding\nc,0,1,0\n"
BOXES = """image_id,rad_id,class_name,x_min,y_min,x_max,y_max
a,R1,Aortic enlargement,10,20,30,60
a,R2,Aortic enlargement,12,22,32,62
a,R2,Atelectasis,5,5,15,25
a,R3,No finding,,,,
"""


def _physionet(tmp_path, boxes=BOXES):
  ann = tmp_path / "annotations"
  ann.mkdir()
  (ann / "image_labels_train.csv").write_text(TRAIN)
  (ann / "image_labels_test.csv").write_text(TEST)
  (ann / "annotations_train.csv").write_text(boxes)
  for split, image in (("train", "a"), ("train", "b"), ("test", "c")):
    (tmp_path / split).mkdir(exist_ok=True)
    (tmp_path / split / f"{image}.dicom").write_bytes(b"")
  return tmp_path


def test_physionet_any_and_majority_readers(tmp_path):
  root = _physionet(tmp_path)
  any_ = sources.load("vindr-cxr", root)
  assert any_.classes == ("Aortic enlargement", "Atelectasis") and any_.official_split
  assert any_.image_ids == ("a", "b", "c") and any_.splits[2] == "test"
  assert any_.labels.tolist() == [[1, 1], [0, 0], [0, 1]]
  assert any_.boxes(0) == [(0, (10.0, 20.0, 20.0, 40.0)), (0, (12.0, 22.0, 20.0, 40.0)),
                           (1, (5.0, 5.0, 10.0, 20.0))]
  most = sources.load("vindr-cxr", root, readers="majority")
  assert most.labels.tolist() == [[1, 0], [0, 0], [0, 1]]  # 2 of 3 for aortic, 1 of 3 not
  assert [c for c, _ in most.boxes(0)] == [0, 0]


def test_competition_rows(tmp_path):
  (tmp_path / "train.csv").write_text(
    ",".join(vindr.COMPETITION_HEADER) + "\n"
    "a,Cardiomegaly,3,R1,100,200,300,260\na,Cardiomegaly,3,R2,101,200,300,262\n"
    "a,No finding,14,R3,,,,\nb,No finding,14,R1,,,,\n")
  with pytest.warns(DataWarning, match=r"2 of 2 images have no file \(a, b\)"):
    idx = sources.load("vindr-cxr", tmp_path, readers="majority")
  assert idx.labels[:, 3].tolist() == [1, 0] and len(idx.boxes(0)) == 2
  assert not idx.official_split and len(idx.classes) == 14


@pytest.mark.parametrize(("line", "match"), [
  ("a,Cardiomegaly,4,R1,1,2,3,4", r"train\.csv:2: class 'Cardiomegaly' with class_id '4'"),
  ("a,No finding,14,R1,1,2,3,4", r"train\.csv:2: a 'No finding' row with a box"),
  ("a,Cardiomegaly,3,R1,,,,", r"train\.csv:2: finding 'Cardiomegaly' without a box"),
  ("a,Cardiomegaly,3,R1,5,2,3,4", r"train\.csv:2: box .* inverted"),
])
def test_competition_bad_rows(tmp_path, line, match):
  (tmp_path / "train.csv").write_text(",".join(vindr.COMPETITION_HEADER) + "\n" + line + "\n")
  with pytest.raises(DataError, match=match):
    sources.load("vindr-cxr", tmp_path)


def test_competition_contradiction_and_duplicate(tmp_path):
  head = ",".join(vindr.COMPETITION_HEADER) + "\n"
  (tmp_path / "train.csv").write_text(head + "a,No finding,14,R1,,,,\na,ILD,5,R1,1,2,3,4\n")
  with pytest.raises(DataError, match=r"train\.csv:3: reader R1 marks 'No finding' and a"):
    sources.load("vindr-cxr", tmp_path)
  (tmp_path / "train.csv").write_text(head + "a,ILD,5,R1,1,2,3,4\na,ILD,5,R1,1,2,3,4\n")
  with pytest.raises(DataError, match=r"train\.csv:3: duplicate row, the same as .*:2"):
    sources.load("vindr-cxr", tmp_path)


@pytest.mark.parametrize(("extra", "match"), [
  ("z,R1,Atelectasis,1,2,3,4", r"annotations_train\.csv:6: image z is not in the image labels"),
  ("b,R1,Atelectasis,1,2,3,4", r"annotations_train\.csv:6: a box of 'Atelectasis', which no"),
  ("a,R1,Aortic enlargement,10,20,30,60", r"annotations_train\.csv:6: duplicate row"),
])
def test_physionet_bad_boxes(tmp_path, extra, match):
  with pytest.raises(DataError, match=match):
    sources.load("vindr-cxr", _physionet(tmp_path, BOXES + extra + "\n"))
