"""CheXpert (Irvin et al., AAAI 2019) as a `SourceIndex`: `read(root, options)`.

What the release holds (Stanford ML Group, https://stanfordmlgroup.github.io/competitions/chexpert/,
and the paper, arXiv:1901.07031, Sec. 2-3), for both CheXpert-v1.0 and CheXpert-v1.0-small:

- `train.csv` (223,414 rows) and `valid.csv` (234 rows, labelled by 3 radiologists), columns
  `Path, Sex, Age, Frontal/Lateral, AP/PA` and the 14 observations `LABELS` (No Finding ...
  Support Devices), each 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank (not
  mentioned in the report);
- `Path` begins with the release folder's name, e.g.
  `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`; the patient is the
  `patientNNNNN` folder; the images are JPEG.

`root` is the release folder (the one holding train.csv; it may be renamed: a Path whose first
folder begins with CheXpert-v1.0 is read under `root` still). Splits: valid.csv is the official
held-out set and becomes `test`; `val_fraction` of the train.csv patients (drawn from the seed)
become `valid` (without valid.csv, a note says there is no test split). A patient in both
files, a duplicate Path, a value outside 1 / 0 / -1 / blank or a view other than Frontal /
Lateral is a `DataError` naming the file and line. With `views="frontal"` (the default)
lateral images are left out and counted in a note.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import index

NAME = "chexpert"
LABELS: tuple[str, ...] = (
  "No Finding",
  "Enlarged Cardiomediastinum",
  "Cardiomegaly",
  "Lung Opacity",
  "Lung Lesion",
  "Edema",
  "Consolidation",
  "Pneumonia",
  "Atelectasis",
  "Pneumothorax",
  "Pleural Effusion",
  "Pleural Other",
  "Fracture",
  "Support Devices",
)
HEADER: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS)
FILES = (("train.csv", "train"), ("valid.csv", "test"))
VIEW_VALUES = ("Frontal", "Lateral")
RELEASE_PREFIX = "CheXpert-v1.0"  # CheXpert-v1.0/, CheXpert-v1.0-small/
_PATIENT = re.compile(r"^patient\d+$")


def image_path(root: Path, text: str) -> str:
  """The file a `Path` value names: its first folder is the release's (as in the official
  CSVs: `root`'s own name, or CheXpert-v1.0... when the folder was renamed), the rest lies
  under `root`; a value without that folder is relative to `root`."""
  head, _, rest = text.partition("/")
  inside = rest and (head == root.name or head.startswith(RELEASE_PREFIX))
  return os.path.join(root, rest if inside else text)


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads a CheXpert release folder; see the module docstring."""
  policy = index.LabelPolicy.of(options)
  ids, paths, patients, splits, labels, where = [], [], [], [], [], []
  first: dict[str, str] = {}
  lateral = 0
  notes = []
  for name, split in FILES:
    path = index.find_file(root, name)
    if path is None:
      if split == "train":
        raise DataError(f"{root}: no {name} (plain or .gz); is this the CheXpert folder?")
      notes.append(f"{root}: no {name} (optional): no test split")
      continue
    _, rows = index.table_rows(path, required=("Path", "Frontal/Lateral", *LABELS))
    for at, row in rows:
      text = row["Path"].strip()
      patient = next((p for p in text.split("/") if _PATIENT.match(p)), None)
      if not text or patient is None:
        raise DataError(f"{at}: Path {text!r} names no patientNNNNN folder")
      if text in first:
        raise DataError(f"{at}: duplicate Path {text} (first at {first[text]})")
      first[text] = at
      view = row["Frontal/Lateral"].strip()
      if view not in VIEW_VALUES:
        raise DataError(f"{at}: 'Frontal/Lateral' is {view!r}, expected Frontal or Lateral")
      values = policy.row([row[c] for c in LABELS], at, LABELS)
      if options.views == "frontal" and view == "Lateral":
        lateral += 1
        continue
      ids.append(text)
      paths.append(image_path(root, text))
      patients.append(patient)
      splits.append(split)
      labels.append(values)
      where.append(at)
  if not ids:
    raise DataError(f"{root}: no image rows (views={options.views})")
  patients_arr = np.asarray(patients)
  splits_arr = np.asarray(splits, dtype="<U5")
  index.check_patient_splits(patients_arr, splits_arr, where)
  splits_arr = index.valid_from_train(patients_arr, splits_arr, options)
  if lateral:
    notes.append(f"{root}: {lateral} lateral images left out (views=frontal)")
  columns = {"ids": ids, "paths": paths, "patients": patients_arr, "splits": splits_arr,
             "labels": labels}
  return index.build(NAME, root, LABELS, columns, options, official_split=True, notes=notes)
