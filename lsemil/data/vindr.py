"""VinDr-CXR (Nguyen et al., Scientific Data 2022) as a `SourceIndex`: `read(root, options)`.

Two layouts of the release are read (the first found wins):

- the PhysioNet release 1.0.0 (https://physionet.org/content/vindr-cxr/1.0.0/):
  `annotations/image_labels_{train,test}.csv` (`image_id`, `rad_id` on the training file,
  then one 0/1 column per finding and diagnosis, 'No finding' among them; one row per image
  and reader; the test labels are the 5 radiologists' consensus, one row per image),
  `annotations/annotations_{train,test}.csv` (`image_id, rad_id, class_name, x_min, y_min,
  x_max, y_max`, one row per box and reader; 'No finding' rows without a box), DICOM
  `train/<image_id>.dicom` and `test/<image_id>.dicom`; official train / test split (valid:
  `val_fraction` of the train images, drawn from the seed);
- the VinBigData Chest X-ray Abnormalities Detection competition (Kaggle,
  https://www.kaggle.com/c/vinbigdata-chest-xray-abnormalities-detection/data): `train.csv`,
  `image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max`, one row per box and
  reader, class 14 'No finding' with an empty box, 14 finding classes (`COMPETITION_CLASSES`,
  class_id 0-13); DICOM `train/<image_id>.dicom`; no labelled test set, so the split is
  patient-wise.

Three radiologists read each training image. A finding is positive when any reader marked it
(`readers="any"`, the default) or when more than half of the image's readers did
(`readers="majority"`); the boxes of a positive class are every reader's boxes of it (their
union is the class's region), in pixels of the original DICOM. The CSVs name no patient, so
each image is its own patient. A class_id that is not its class_name's, a box on a
'No finding' row or none on a finding's, an inverted or negative box, a reader who marks
'No finding' and a finding on one image, a value other than 0 / 1, a box of an image or class
the labels do not list, or a repeated row is a `DataError` naming the file and line.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import index

NAME = "vindr-cxr"
NO_FINDING = "No finding"
COMPETITION_CLASSES: tuple[str, ...] = (
  "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
  "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
)  # fmt: skip
COMPETITION_NAME = "train.csv"
COMPETITION_HEADER = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max",
                      "y_max")
ANNOTATIONS = "annotations"
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def _box(row: dict, at: str) -> tuple[float, float, float, float] | None:
  """(x, y, w, h) of a row's x_min..y_max, None when all four are blank."""
  cells = [row[k].strip() for k in BOX_COLUMNS]
  if not any(cells):
    return None
  try:
    x0, y0, x1, y1 = (float(c) for c in cells)
  except ValueError:
    raise DataError(f"{at}: box {cells} is not four numbers") from None
  if not all(map(math.isfinite, (x0, y0, x1, y1))) or x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
    raise DataError(f"{at}: box x_min={x0:g} y_min={y0:g} x_max={x1:g} y_max={y1:g} is empty, "
                    "inverted or off the image")
  return (x0, y0, x1 - x0, y1 - y0)


class _Votes:
  """Readers per image and per (image, class), boxes per (image, class), in file order."""

  def __init__(self, classes: tuple[str, ...]):
    self.classes = classes
    self.readers: dict[str, set[str]] = {}
    self.marked: dict[tuple[str, int], set[str]] = defaultdict(set)
    self.boxes: dict[tuple[str, int], list[tuple[float, ...]]] = defaultdict(list)
    self.no_finding: dict[tuple[str, str], str] = {}
    self.finding: dict[tuple[str, str], str] = {}
    self.seen: dict[tuple, str] = {}

  def add(self, image: str, reader: str, name: str, box, at: str) -> None:
    key = (image, reader, name, box)
    if key in self.seen:
      raise DataError(f"{at}: duplicate row, the same as {self.seen[key]}")
    self.seen[key] = at
    self.readers.setdefault(image, set()).add(reader)
    if name == NO_FINDING:
      if box is not None:
        raise DataError(f"{at}: a 'No finding' row with a box")
      other = self.finding.get((image, reader))
      self.no_finding[image, reader] = at
    else:
      c = self.classes.index(name)
      self.marked[image, c].add(reader)
      if box is not None:
        self.boxes[image, c].append(box)
      other = self.no_finding.get((image, reader))
      self.finding.setdefault((image, reader), at)
    if other is not None:
      raise DataError(f"{at}: reader {reader} marks 'No finding' and a finding on {image} "
                      f"(see {other})")

  def positive(self, image: str, c: int, policy: str) -> bool:
    votes = len(self.marked.get((image, c), ()))
    return votes > 0 if policy == "any" else 2 * votes > len(self.readers[image])


def _competition(path: Path, votes: _Votes) -> None:
  _, rows = index.table_rows(path, required=COMPETITION_HEADER)
  for at, row in rows:
    image, name, reader = row["image_id"].strip(), row["class_name"].strip(), row["rad_id"].strip()
    names = (*COMPETITION_CLASSES, NO_FINDING)
    if name not in names or row["class_id"].strip() != str(names.index(name)):
      raise DataError(f"{at}: class {name!r} with class_id {row['class_id']!r} (expected one of "
                      "the 15 names with its id 0-14)")
    box = _box(row, at)
    if box is None and name != NO_FINDING:
      raise DataError(f"{at}: finding {name!r} without a box")
    votes.add(image, reader, name, box, at)


def _physionet_labels(path: Path, votes: _Votes, images: dict[str, str], split: str) -> None:
  header, rows = index.table_rows(path, required=("image_id",))
  columns = [c for c in header if c not in ("image_id", "rad_id")]
  unknown = [c for c in columns if c != NO_FINDING and c not in votes.classes]
  if unknown:
    raise DataError(f"{path}:1: class columns {unknown} are not those of the training labels")
  first: dict[tuple[str, str], str] = {}
  for at, row in rows:
    image, reader = row["image_id"].strip(), row.get("rad_id", "consensus").strip()
    if images.setdefault(image, split) != split:
      raise DataError(f"{at}: image {image} is in both the train and the test labels")
    if (image, reader) in first:
      raise DataError(f"{at}: duplicate row of {image} by {reader} (see {first[image, reader]})")
    first[image, reader] = at
    votes.readers.setdefault(image, set())
    for c in columns:
      cell = row[c].strip()
      if cell not in ("0", "1", "0.0", "1.0"):
        raise DataError(f"{at}: {c!r} is {row[c]!r}, expected 0 or 1")
      if float(cell) == 1:
        votes.add(image, reader, c, None, at)
    votes.readers[image].add(reader)


def _physionet_boxes(path: Path, votes: _Votes) -> None:
  _, rows = index.table_rows(path, required=("image_id", "class_name", *BOX_COLUMNS))
  for at, row in rows:
    image, name = row["image_id"].strip(), row["class_name"].strip()
    if image not in votes.readers:
      raise DataError(f"{at}: image {image} is not in the image labels")
    if name == NO_FINDING:
      continue
    if name not in votes.classes:
      raise DataError(f"{at}: unknown class {name!r}")
    box = _box(row, at)
    if box is None:
      raise DataError(f"{at}: finding {name!r} without a box")
    c = votes.classes.index(name)
    if not votes.marked.get((image, c)):
      raise DataError(f"{at}: a box of {name!r}, which no label of {image} marks")
    key = (image, row.get("rad_id", "consensus").strip(), name, box)
    if key in votes.seen:
      raise DataError(f"{at}: duplicate row, the same as {votes.seen[key]}")
    votes.seen[key] = at
    votes.boxes[image, c].append(box)


def _physionet_classes(path: Path) -> tuple[str, ...]:
  header, _ = index.table_rows(path, required=("image_id",))
  return tuple(c for c in header if c not in ("image_id", "rad_id", NO_FINDING))


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads a VinDr-CXR folder in either layout; see the module docstring."""
  train_labels = index.find_file(root / ANNOTATIONS, "image_labels_train.csv")
  images: dict[str, str] = {}
  if train_labels is not None:
    votes = _Votes(_physionet_classes(train_labels))
    _physionet_labels(train_labels, votes, images, "train")
    test_labels = index.find_file(root / ANNOTATIONS, "image_labels_test.csv")
    if test_labels is not None:
      _physionet_labels(test_labels, votes, images, "test")
    for name in ("annotations_train.csv", "annotations_test.csv"):
      boxes = index.find_file(root / ANNOTATIONS, name)
      if boxes is not None:
        _physionet_boxes(boxes, votes)
    official = True
  else:
    path = index.find_file(root, COMPETITION_NAME)
    if path is None:
      raise DataError(f"{root}: neither {ANNOTATIONS}/image_labels_train.csv (PhysioNet) nor "
                      f"{COMPETITION_NAME} (VinBigData competition)")
    votes = _Votes(COMPETITION_CLASSES)
    _competition(path, votes)
    images = dict.fromkeys(votes.readers, "train")
    official = False
  ids = list(votes.readers)
  row_of = {image: i for i, image in enumerate(ids)}
  labels = np.zeros((len(ids), len(votes.classes)), np.float32)
  box_rows, box_classes, xywh = [], [], []
  for image in ids:
    for c in range(len(votes.classes)):
      if votes.positive(image, c, options.readers):
        labels[row_of[image], c] = 1
        for box in votes.boxes.get((image, c), ()):
          box_rows.append(row_of[image])
          box_classes.append(c)
          xywh.append(box)
  patients = np.asarray(ids)
  if official:
    splits = index.valid_from_train(patients, np.asarray([images[i] for i in ids], "<U5"),
                                    options)
  else:
    splits = index.patient_splits(patients, options)
  columns = {"ids": ids, "paths": [f"{root}/{images[i]}/{i}.dicom" for i in ids],
             "patients": patients, "splits": splits, "labels": labels}
  boxes = (np.asarray(box_rows, np.int64), np.asarray(box_classes, np.int64),
           np.asarray(xywh, np.float64).reshape(-1, 4))
  return index.build(NAME, root, votes.classes, columns, options, official_split=official,
                     boxes=boxes)
