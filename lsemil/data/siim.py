"""SIIM-ACR Pneumothorax Segmentation (2019) as a `SourceIndex`, and its run-length masks.

What the release holds (Kaggle, https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation/data,
and the competition's `mask_functions.py`, `rle2mask` / `mask2rle`):

- `train-rle.csv` (or stage 2's `stage_2_train.csv`): header `ImageId, EncodedPixels` (with a
  space before the second name), one row per mask component: `-1` for an image without
  pneumothorax, else the competition's run-length code (below); the components of one image
  are united;
- the DICOM images in nested folders, `dicom-images-train/<study>/<series>/<ImageId>.dcm`,
  1024x1024.

The run-length code: whitespace-separated pairs (start, length) over the pixels in
column-major order (down the first column, then the next), each start counted from the end of
the previous run (the first from pixel 0): `decode_rle` / `encode_rle`.

One class, `CLASSES` = ('Pneumothorax',), with its masks in `SourceIndex.masks`. The CSV names
no patient, so each image is its own patient and the split is patient-wise
(`index.patient_splits`). A malformed code, a run past the image's last pixel, -1 beside a
mask of the same image, or a repeated row is a `DataError` naming the file and line. A
`lsemil_dataset.json` marker with `image_size` (a synthetic set) replaces 1024.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import index, nih

NAME = "siim-acr"
CLASSES: tuple[str, ...] = ("Pneumothorax",)
RLE_NAMES = ("train-rle.csv", "stage_2_train.csv")
IMAGES_DIR = "dicom-images-train"
EMPTY = "-1"
ORIGINAL_SIZE = 1024


def runs(text: str, pixels: int) -> np.ndarray:
  """(start, end) of each run in column-major pixel numbers, ends exclusive.

  Raises:
    ValueError: not pairs of integers, a negative start or a length < 1, or a run past
      `pixels`.
  """
  try:
    values = np.asarray([int(v) for v in text.split()], np.int64)
  except ValueError:
    raise ValueError("not whitespace-separated integers") from None
  if len(values) == 0 or len(values) % 2:
    raise ValueError(f"{len(values)} numbers, expected (start, length) pairs")
  starts, lengths = values[0::2], values[1::2]
  if (starts < 0).any() or (lengths < 1).any():
    raise ValueError("a negative start or a length below 1")
  ends = np.cumsum(starts + lengths)
  if ends[-1] > pixels:
    raise ValueError(f"its runs end at pixel {int(ends[-1])}, past the image's {pixels}")
  return np.stack([ends - lengths, ends], axis=1)


def decode_rle(text: str, height: int, width: int) -> np.ndarray:
  """A bool (height, width) mask from the competition's code ('-1': empty)."""
  flat = np.zeros(height * width, bool)
  if text.strip() != EMPTY:
    for start, end in runs(text, height * width):
      flat[start:end] = True
  return flat.reshape(width, height).T


def encode_rle(mask: np.ndarray) -> str:
  """The competition's code of a bool (height, width) mask ('-1' when it is empty)."""
  flat = np.asarray(mask, bool).T.reshape(-1)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], flat.view(np.int8), [0]])))
  if len(edges) == 0:
    return EMPTY
  starts, ends = edges[0::2], edges[1::2]
  gaps = starts - np.concatenate([[0], ends[:-1]])
  return " ".join(f"{g} {n}" for g, n in zip(gaps.tolist(), (ends - starts).tolist(), strict=True))


def _dicom_files(folder: Path) -> dict[str, str]:
  """ImageId -> file of every .dcm under `folder` (any depth)."""
  found: dict[str, Path] = {}
  for top, _, names in os.walk(folder):
    for name in names:
      if name.endswith(".dcm"):
        found.setdefault(name[:-4], os.path.join(top, name))
  return found


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads a SIIM-ACR folder; see the module docstring."""
  path = next((p for n in RLE_NAMES if (p := index.find_file(root, n))), None)
  if path is None:
    raise DataError(f"{root}: no {' or '.join(RLE_NAMES)} (plain or .gz)")
  side = int(nih.read_marker(root).get("image_size", ORIGINAL_SIZE))
  _, rows = index.table_rows(path, required=("ImageId", "EncodedPixels"))
  codes: dict[str, list[str]] = {}
  seen: dict[tuple[str, str], str] = {}
  for at, row in rows:
    image, code = row["ImageId"].strip(), " ".join(row["EncodedPixels"].split())
    if not image or not code:
      raise DataError(f"{at}: empty ImageId or EncodedPixels")
    if (image, code) in seen:
      raise DataError(f"{at}: duplicate row, the same as {seen[image, code]}")
    if code != EMPTY:
      try:
        runs(code, side * side)
      except ValueError as e:
        raise DataError(f"{at}: EncodedPixels of {image}: {e} ({side}x{side} image)") from None
    previous = codes.setdefault(image, [])
    if previous and (code == EMPTY or previous == [EMPTY]):
      first = next(a for (i, _), a in seen.items() if i == image)
      raise DataError(f"{at}: {image} has -1 and a mask (see {first})")
    seen[image, code] = at
    previous.append(code)
  ids = list(codes)
  on_disk = _dicom_files(root / IMAGES_DIR)
  patients = np.asarray(ids)
  positive = [codes[i] != [EMPTY] for i in ids]
  columns = {
    "ids": ids,
    "paths": [on_disk.get(i, f"{root}/{IMAGES_DIR}/{i}.dcm") for i in ids],
    "patients": patients,
    "splits": index.patient_splits(patients, options),
    "labels": [[float(p)] for p in positive],
  }
  masks = {r: {0: tuple(codes[i])} for r, i in enumerate(ids) if positive[r]}
  return index.build(NAME, root, CLASSES, columns, options, official_split=False, masks=masks,
                     image_size=(side, side))


def mask(source_index: index.SourceIndex, row: int, cls: int = 0) -> np.ndarray:
  """The union of one row's mask components of class `cls` (bool (H, W); empty if none)."""
  height, width = source_index.image_size or (ORIGINAL_SIZE, ORIGINAL_SIZE)
  out = np.zeros((height, width), bool)
  for code in source_index.masks.get(row, {}).get(cls, ()):
    out |= decode_rle(code, height, width)
  return out
