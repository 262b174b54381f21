"""The RSNA Pneumonia reader (lsemil.data.rsna): one row per box, blank boxes for negatives."""

from __future__ import annotations

import pytest

from lsemil.core.errors import DataError, DataWarning
from lsemil.data import sources

HEAD = "patientId,x,y,width,height,Target"
GOOD = [f"{HEAD}", "p1,264.0,152.0,213.0,379.0,1", "p1,562.0,152.0,256.0,453.0,1",
        "p2,,,,,0", "p3,,,,,0"]


def _folder(tmp_path, lines, details=None):
  (tmp_path / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
  if details is not None:
    (tmp_path / "stage_2_detailed_class_info.csv").write_text(
      "patientId,class\n" + "\n".join(details) + "\n")
  return tmp_path


def test_boxes_labels_and_notes(tmp_path):
  root = _folder(tmp_path, GOOD)
  (root / "stage_2_train_images").mkdir()
  (root / "stage_2_train_images" / "p2.dcm").write_bytes(b"")
  with pytest.warns(DataWarning) as caught:
    idx = sources.load("rsna-pneumonia", root)
  notes = [str(w.message) for w in caught]
  assert any("no stage_2_detailed_class_info.csv (optional" in n for n in notes)
  assert any("2 of 3 images have no file (p1, p3)" in n for n in notes)
  assert idx.image_ids == ("p1", "p2", "p3") and idx.labels[:, 0].tolist() == [1, 0, 0]
  assert idx.boxes(0) == [(0, (264.0, 152.0, 213.0, 379.0)), (0, (562.0, 152.0, 256.0, 453.0))]
  assert idx.image_size == (1024, 1024) and not idx.official_split


@pytest.mark.parametrize(("extra", "details", "match"), [
  (["p4,1000,10,30,30,1"], None, r"labels\.csv:6: box .* lies outside the 1024x1024 image"),
  (["p4,,,,,1"], None, r"labels\.csv:6: Target 1 with no box"),
  (["p1,,,,,0"], None, r"labels\.csv:6: Target 0 for p1, which has Target 1 at .*:2"),
  (["p1,264.0,152.0,213.0,379.0,1"], None, r"labels\.csv:6: duplicate box, the same as .*:2"),
  (["p4,1,2,3,4,2"], None, r"labels\.csv:6: patientId 'p4' with Target '2'"),
  ([], ["p2,Lung Opacity"], r"class_info\.csv:2: class 'Lung Opacity' contradicts Target 0"),
  ([], ["p9,Normal"], r"class_info\.csv:2: patientId p9 is not in"),
])
def test_bad_rows_name_file_and_line(tmp_path, extra, details, match):
  with pytest.raises(DataError, match=match):
    sources.load("rsna-pneumonia", _folder(tmp_path, GOOD + extra, details))
