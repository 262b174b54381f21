"""MIMIC-CXR-JPG 2.0.0 as a `SourceIndex`: `read(root, options)`.

What the release holds (PhysioNet, https://physionet.org/content/mimic-cxr-jpg/2.0.0/; Johnson
et al., arXiv:1901.07042), in the folder `root`, each file gzipped (plain is read too):

- `mimic-cxr-2.0.0-chexpert.csv.gz`: `subject_id, study_id` and the 14 CheXpert labeller
  observations (`chexpert.LABELS`, alphabetical in this file), 1.0 / 0.0 / -1.0 / blank, one
  row per study;
- `mimic-cxr-2.0.0-split.csv.gz`: `dicom_id, study_id, subject_id, split` (train, validate,
  test), the official patient-wise split, one row per image;
- `mimic-cxr-2.0.0-metadata.csv.gz`: `dicom_id, subject_id, study_id, ..., ViewPosition, Rows,
  Columns, ...`, one row per image;
- the images `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg` (XX: the subject id's first two digits).

Rows are the split file's images; `validate` becomes `valid`. With `views="frontal"` (the
default) only ViewPosition PA and AP are kept, the rest counted in a note. A study without a
labels row has every label unknown (NaN), counted in a note. An image missing from the
metadata, ids that disagree between files, a duplicate dicom_id or study, a value outside
1 / 0 / -1 / blank, a class column that is not a CheXpert observation, or a patient in two
splits is a `DataError` naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import chexpert, index

NAME = "mimic-cxr-jpg"
PREFIX = "mimic-cxr-2.0.0-"
LABELS_NAME = PREFIX + "chexpert.csv"
SPLIT_NAME = PREFIX + "split.csv"
METADATA_NAME = PREFIX + "metadata.csv"
IDS = ("dicom_id", "study_id", "subject_id")
SPLIT_OF = {"train": "train", "validate": "valid", "test": "test"}
FRONTAL = ("PA", "AP")


def _need(root: Path, name: str) -> Path:
  path = index.find_file(root, name)
  if path is None:
    raise DataError(f"{root}: no {name}.gz (or {name})")
  return path


def _labels(path: Path, policy: index.LabelPolicy):
  header, rows = index.table_rows(path, required=("subject_id", "study_id"))
  columns = [c for c in header if c not in ("subject_id", "study_id")]
  unknown = sorted(set(columns) - set(chexpert.LABELS))
  if unknown or len(columns) != len(chexpert.LABELS):
    raise DataError(f"{path}:1: class columns {columns} are not the 14 CheXpert observations"
                    f"{' (unknown: ' + ', '.join(unknown) + ')' if unknown else ''}")
  order = [columns.index(c) for c in chexpert.LABELS]
  out: dict[str, tuple[str, list[float], str]] = {}
  for at, row in rows:
    study = row["study_id"].strip()
    if study in out:
      raise DataError(f"{at}: duplicate study_id {study} (first at {out[study][2]})")
    values = policy.row([row[c] for c in columns], at, columns)
    out[study] = (row["subject_id"].strip(), [values[k] for k in order], at)
  return out


def _metadata(path: Path) -> dict[str, tuple[str, str, str, str]]:
  _, rows = index.table_rows(path, required=(*IDS, "ViewPosition"))
  out: dict[str, tuple[str, str, str, str]] = {}
  for at, row in rows:
    dicom = row["dicom_id"].strip()
    if dicom in out:
      raise DataError(f"{at}: duplicate dicom_id {dicom} (first at {out[dicom][3]})")
    out[dicom] = (row["study_id"].strip(), row["subject_id"].strip(),
                  row["ViewPosition"].strip(), at)
  return out


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads a MIMIC-CXR-JPG folder; see the module docstring."""
  split_path = _need(root, SPLIT_NAME)
  labels = _labels(_need(root, LABELS_NAME), index.LabelPolicy.of(options))
  metadata = _metadata(_need(root, METADATA_NAME))
  _, rows = index.table_rows(split_path, required=(*IDS, "split"))
  ids, paths, patients, splits, values, where = [], [], [], [], [], []
  seen: dict[str, str] = {}
  other_views = unlabelled = 0
  nan = [np.nan] * len(chexpert.LABELS)
  for at, row in rows:
    dicom, study, subject = (row[k].strip() for k in IDS)
    if dicom in seen:
      raise DataError(f"{at}: duplicate dicom_id {dicom} (first at {seen[dicom]})")
    seen[dicom] = at
    split = SPLIT_OF.get(row["split"].strip())
    if split is None:
      raise DataError(f"{at}: split {row['split']!r}, expected one of {', '.join(SPLIT_OF)}")
    meta = metadata.get(dicom)
    if meta is None:
      raise DataError(f"{at}: image {dicom} is not in {METADATA_NAME}")
    if meta[:2] != (study, subject):
      raise DataError(f"{at}: study/subject {study}/{subject} of {dicom}, but {meta[0]}/"
                      f"{meta[1]} at {meta[3]}")
    label = labels.get(study)
    if label is not None and label[0] != subject:
      raise DataError(f"{at}: study {study} of subject {subject}, but {label[0]} at {label[2]}")
    if options.views == "frontal" and meta[2] not in FRONTAL:
      other_views += 1
      continue
    unlabelled += label is None
    ids.append(dicom)
    paths.append(f"{root}/files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg")
    patients.append(subject)
    splits.append(split)
    values.append(nan if label is None else label[1])
    where.append(at)
  patients_arr, splits_arr = np.asarray(patients), np.asarray(splits, dtype="<U5")
  index.check_patient_splits(patients_arr, splits_arr, where)
  notes = []
  if other_views:
    notes.append(f"{root}: {other_views} images of other views than PA / AP left out "
                 "(views=frontal)")
  if unlabelled:
    notes.append(f"{root}: {unlabelled} images belong to studies without a row in "
                 f"{LABELS_NAME}; their labels are unknown")
  columns = {"ids": ids, "paths": paths, "patients": patients_arr, "splits": splits_arr,
             "labels": values}
  return index.build(NAME, root, chexpert.LABELS, columns, options, official_split=True,
                     notes=notes)
