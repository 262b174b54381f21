"""ChestX-Det10 (Liu et al. 2020, arXiv:2006.10550) as a `SourceIndex`: `read(root, options)`.

What the release holds (github.com/Deepwise-AILab/ChestX-Det10-Dataset, README.md and eval.py):

- `train.json` and `test.json`: a JSON list with one object per image,
  `{"file_name": "36302.png", "syms": [class, ...], "boxes": [[x1, y1, x2, y2], ...]}`,
  `syms[i]` the class of `boxes[i]`; an image without findings has both lists empty;
  x1, y1 the upper-left and x2, y2 the lower-right corner in pixels of the 1024x1024 image;
  eval.py's IOU counts both corners in (width x2 - x1 + 1), so a box here is
  (x1, y1, x2 - x1 + 1, y2 - y1 + 1);
- the PNG images (train_data.zip, test_data.zip), found here under `train_data/`, `test_data/`
  (any depth) or `images/`.

Ten classes (`CLASSES`, the README's order). The official split is kept (train.json -> train,
test.json -> test) and `val_fraction` of the train images become valid
(`index.valid_from_train`); the file names are renumbered NIH images without patient ids, so
each image is its own patient. An unknown class, syms and boxes of different lengths, a box
that is not four numbers with x1 <= x2, y1 <= y2 inside the image, an image in both files or
twice in one is a `DataError` naming the file and the image's position in its list (1-based,
`file:#n`; the release writes the list on one line). A `lsemil_dataset.json` marker with
`image_size` (a synthetic set) replaces 1024.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import index, nih

NAME = "chestx-det10"
CLASSES: tuple[str, ...] = (
  "Atelectasis", "Calcification", "Consolidation", "Effusion", "Emphysema",
  "Fibrosis", "Fracture", "Mass", "Nodule", "Pneumothorax",
)  # fmt: skip
FILES = (("train.json", "train"), ("test.json", "test"))
IMAGE_DIRS = ("train_data", "test_data", "images")
ORIGINAL_SIZE = 1024


def _image_files(root: Path) -> dict[str, str]:
  """file name -> path of every .png under the image folders (any depth)."""
  found: dict[str, str] = {}
  for name in IMAGE_DIRS:
    for top, _, files in os.walk(root / name):
      for f in files:
        if f.endswith(".png"):
          found.setdefault(f, os.path.join(top, f))
  return found


def _entries(path: Path) -> list:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise DataError(f"{path}: not readable JSON ({e})") from e
  if not isinstance(data, list):
    raise DataError(f"{path}: expected a JSON list of images, got {type(data).__name__}")
  return data


def _boxes(entry, at: str, side: int) -> list[tuple[int, tuple[float, ...]]]:
  """(class index, (x, y, w, h)) of one image's syms and boxes."""
  try:
    syms, boxes = list(entry["syms"]), list(entry["boxes"])
  except (KeyError, TypeError) as e:
    raise DataError(f"{at}: expected file_name, syms and boxes ({e})") from None
  if len(syms) != len(boxes):
    raise DataError(f"{at}: {len(syms)} syms but {len(boxes)} boxes")
  out = []
  for sym, box in zip(syms, boxes, strict=True):
    if sym not in CLASSES:
      raise DataError(f"{at}: class {sym!r}, expected one of {', '.join(CLASSES)}")
    try:
      x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
      raise DataError(f"{at}: box {box!r} is not four numbers x1, y1, x2, y2") from None
    if not (0 <= x1 <= x2 < side and 0 <= y1 <= y2 < side):
      raise DataError(f"{at}: box {box} is not x1 <= x2, y1 <= y2 inside the {side}x{side} image")
    out.append((CLASSES.index(sym), (x1, y1, x2 - x1 + 1, y2 - y1 + 1)))
  return out


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads a ChestX-Det10 folder; see the module docstring."""
  side = int(nih.read_marker(root).get("image_size", ORIGINAL_SIZE))
  on_disk = _image_files(root)
  ids, splits, labels, where = [], [], [], {}
  box_rows, box_classes, box_xywh = [], [], []
  for name, split in FILES:
    path = root / name
    if not path.is_file():
      raise DataError(f"{root}: no {name}")
    for n, entry in enumerate(_entries(path), start=1):
      at = f"{path}:#{n}"
      image = entry.get("file_name") if isinstance(entry, dict) else None
      if not isinstance(image, str) or not image:
        raise DataError(f"{at}: no file_name")
      if image in where:
        raise DataError(f"{at}: {image} is listed again (first at {where[image]})")
      where[image] = at
      found = _boxes(entry, at, side)
      row = np.zeros(len(CLASSES), np.float32)
      for k, xywh in found:
        row[k] = 1.0
        box_rows.append(len(ids))
        box_classes.append(k)
        box_xywh.append(xywh)
      ids.append(image)
      splits.append(split)
      labels.append(row)
  patients = np.asarray(ids)
  columns = {
    "ids": ids,
    "paths": [on_disk.get(i, f"{root}/images/{i}") for i in ids],
    "patients": patients,
    "splits": index.valid_from_train(patients, np.asarray(splits, "<U5"), options),
    "labels": labels,
  }
  boxes = (
    np.asarray(box_rows, np.int64),
    np.asarray(box_classes, np.int64),
    np.asarray(box_xywh, np.float64).reshape(-1, 4),
  )
  return index.build(NAME, root, CLASSES, columns, options, official_split=True, boxes=boxes,
                     image_size=(side, side))  # fmt: skip
