"""The RSNA Pneumonia Detection Challenge (2018) as a `SourceIndex`: `read(root, options)`.

What the release holds (Kaggle, https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data;
Shih et al., Radiology: AI 2019, doi:10.1148/ryai.2019180041):

- `stage_2_train_labels.csv`: `patientId,x,y,width,height,Target`, one row per box; a
  negative image (Target 0) has one row with the four box cells blank; (x, y) is the box's
  upper-left corner, pixels of the 1024x1024 image; 30,227 rows, 26,684 images;
- `stage_2_detailed_class_info.csv` (optional): `patientId,class`, class one of
  `DETAILED_CLASSES`; 'Lung Opacity' exactly where Target is 1;
- `stage_2_train_images/<patientId>.dcm`, one DICOM per patientId (which names an image).

One class, `CLASSES` = ('Lung Opacity',): Target. There is no official split of the labelled
images (stage 2's test set has no labels), so the split is patient-wise (`index.patient_splits`),
each patientId its own patient. A Target other than 0 / 1, a box on a Target-0 row or none on a
Target-1 row, an image with both, a box outside the image, a repeated box, or a class of the
detailed file that contradicts Target is a `DataError` naming the file and line. A
`lsemil_dataset.json` marker with `image_size` (a synthetic set) replaces 1024.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import index, nih

NAME = "rsna-pneumonia"
CLASSES: tuple[str, ...] = ("Lung Opacity",)
LABELS_NAME = "stage_2_train_labels.csv"
DETAILS_NAME = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
HEADER = ("patientId", "x", "y", "width", "height", "Target")
DETAILED_CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
ORIGINAL_SIZE = 1024


def image_side(root: Path) -> int:
  """The side of the release's square images: 1024, or the marker's `image_size`."""
  return int(nih.read_marker(root).get("image_size", ORIGINAL_SIZE))


def _check_details(path: Path, target: dict[str, int], where: dict[str, str]) -> None:
  _, rows = index.table_rows(path, required=("patientId", "class"))
  for at, row in rows:
    pid, name = row["patientId"].strip(), row["class"].strip()
    if name not in DETAILED_CLASSES:
      raise DataError(f"{at}: class {name!r}, expected one of {', '.join(DETAILED_CLASSES)}")
    if pid not in target:
      raise DataError(f"{at}: patientId {pid} is not in {LABELS_NAME}")
    if (name == "Lung Opacity") != (target[pid] == 1):
      raise DataError(f"{at}: class {name!r} contradicts Target {target[pid]} at {where[pid]}")


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads an RSNA Pneumonia folder; see the module docstring."""
  path = index.find_file(root, LABELS_NAME)
  if path is None:
    raise DataError(f"{root}: no {LABELS_NAME} (plain or .gz)")
  side = image_side(root)
  _, rows = index.table_rows(path, required=HEADER)
  target: dict[str, int] = {}
  where: dict[str, str] = {}
  boxes: dict[tuple, str] = {}
  box_rows, box_xywh = [], []
  for at, row in rows:
    pid, t = row["patientId"].strip(), row["Target"].strip()
    if not pid or t not in ("0", "1"):
      raise DataError(f"{at}: patientId {pid!r} with Target {t!r}, expected an id and 0 or 1")
    box = index.xywh_box([row[k] for k in ("x", "y", "width", "height")], at, side)
    if (box is None) != (t == "0"):
      what = "a box" if box is not None else "no box"
      raise DataError(f"{at}: Target {t} with {what}")
    if target.setdefault(pid, int(t)) != int(t):
      raise DataError(f"{at}: Target {t} for {pid}, which has Target {target[pid]} at {where[pid]}")
    if t == "0" and pid in where:
      raise DataError(f"{at}: duplicate negative row for {pid} (first at {where[pid]})")
    where.setdefault(pid, at)
    if box is not None:
      if (pid, box) in boxes:
        raise DataError(f"{at}: duplicate box, the same as {boxes[pid, box]}")
      boxes[pid, box] = at
      box_rows.append(pid)
      box_xywh.append(box)
  ids = list(target)
  row_of = {pid: i for i, pid in enumerate(ids)}
  notes = []
  details = index.find_file(root, DETAILS_NAME)
  if details is None:
    notes.append(f"{root}: no {DETAILS_NAME} (optional; not checked)")
  else:
    _check_details(details, target, where)
  patients = np.asarray(ids)
  columns = {
    "ids": ids,
    "paths": [f"{root}/{IMAGES_DIR}/{pid}.dcm" for pid in ids],
    "patients": patients,
    "splits": index.patient_splits(patients, options),
    "labels": [[float(target[pid])] for pid in ids],
  }
  box_arrays = (np.asarray([row_of[p] for p in box_rows], np.int64),
                np.zeros(len(box_rows), np.int64), np.asarray(box_xywh, np.float64).reshape(-1, 4))
  return index.build(NAME, root, CLASSES, columns, options, official_split=False, notes=notes,
                     boxes=box_arrays, image_size=(side, side))
