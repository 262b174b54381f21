"""Any labelled chest X-ray folder, described by a CSV (the `csv` source): `read(root, options)`.

The format (lsemil's own, documented here and in README):

- `labels.csv`: columns `path` (the image, relative to the folder; PNG, JPEG or DICOM),
  `patient` (any text), optionally `split` (train, valid or test on every row), and one column
  per class, each cell 1 (present), 0 (absent), -1 (uncertain) or blank (not stated), read
  under the uncertain / blank policies of `lsemil.data.index.Options`. The class columns are
  the class list, in file order.
- `boxes.csv` (optional): `path, class, x, y, w, h`, one row per box, (x, y) its top-left
  corner and (w, h) its size in pixels of the image as stored; `path` must be a row of
  labels.csv and `class` one of its class columns.

Without a `split` column the split is patient-wise (`index.patient_splits`). A duplicate path,
a patient in two splits, a value outside 1 / 0 / -1 / blank, an unknown split or class, or a
box with w or h <= 0 or a negative corner is a `DataError` naming the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import index

NAME = "csv"
LABELS_NAME = "labels.csv"
BOXES_NAME = "boxes.csv"
RESERVED = ("path", "patient", "split")
BOX_HEADER = ("path", "class", "x", "y", "w", "h")


def _read_boxes(path: Path, row_of: dict[str, int], classes: tuple[str, ...]):
  _, rows = index.table_rows(path, required=BOX_HEADER)
  out_rows, out_classes, xywh = [], [], []
  first: dict[tuple, str] = {}
  for at, row in rows:
    image, name = row["path"].strip(), row["class"].strip()
    box = index.xywh_box([row[k] for k in "xywh"], at)
    if image not in row_of or name not in classes or box is None:
      what = (f"image {image!r} is not a row of {LABELS_NAME}" if image not in row_of else
              f"unknown class {name!r} (the class columns: {', '.join(classes)})"
              if name not in classes else "no box")
      raise DataError(f"{at}: {what}")
    key = (image, name, box)
    if key in first:
      raise DataError(f"{at}: duplicate box, the same as {first[key]}")
    first[key] = at
    out_rows.append(row_of[image])
    out_classes.append(classes.index(name))
    xywh.append(box)
  return (np.asarray(out_rows, np.int64), np.asarray(out_classes, np.int64),
          np.asarray(xywh, np.float64).reshape(-1, 4))


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads a folder in the format of the module docstring."""
  path = index.find_file(root, LABELS_NAME)
  if path is None:
    raise DataError(f"{root}: no {LABELS_NAME} (plain or .gz); see `lsemil.data.catalog`")
  header, rows = index.table_rows(path, required=("path", "patient"))
  classes = tuple(c for c in header if c not in RESERVED)
  if not classes:
    raise DataError(f"{path}:1: no class columns besides {', '.join(RESERVED)}")
  if len(set(header)) != len(header):
    raise DataError(f"{path}:1: a column name appears twice in {header}")
  has_split = "split" in header
  policy = index.LabelPolicy.of(options)
  ids, paths, patients, splits, labels, where = [], [], [], [], [], []
  row_of: dict[str, int] = {}
  for at, row in rows:
    image, patient = row["path"].strip(), row["patient"].strip()
    if not image or not patient:
      raise DataError(f"{at}: empty path or patient")
    if image in row_of:
      raise DataError(f"{at}: duplicate path {image} (first at {where[row_of[image]]})")
    split = row["split"].strip() if has_split else "train"
    if split not in index.SPLITS:
      raise DataError(f"{at}: split {split!r}, expected one of {', '.join(index.SPLITS)}")
    row_of[image] = len(ids)
    ids.append(image)
    paths.append(os.path.join(root, image))
    patients.append(patient)
    splits.append(split)
    labels.append(policy.row([row[c] for c in classes], at, classes))
    where.append(at)
  patients_arr = np.asarray(patients)
  if has_split:
    splits_arr = np.asarray(splits, dtype="<U5")
    index.check_patient_splits(patients_arr, splits_arr, where)
  else:
    splits_arr = index.patient_splits(patients_arr, options)
  boxes_path = index.find_file(root, BOXES_NAME)
  boxes = None if boxes_path is None else _read_boxes(boxes_path, row_of, classes)
  columns = {"ids": ids, "paths": paths, "patients": patients_arr, "splits": splits_arr,
             "labels": labels}
  return index.build(NAME, root, classes, columns, options, official_split=has_split,
                     boxes=boxes)
