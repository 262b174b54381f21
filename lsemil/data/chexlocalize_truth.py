"""CheXlocalize's ground-truth segmentations (Saporta et al., Nature Machine Intelligence 2022) as a
`SourceIndex`, and COCO RLE masks: `read(root, options)`, `mask`, `rle_mask`.

What the release holds (github.com/rajpurkarlab/cheXlocalize, README.md "Evaluate localization
performance" and eval_constants.py; Stanford AIMI's CheXlocalize download):

- `CheXlocalize/gt_segmentations_val.json` and `CheXlocalize/gt_segmentations_test.json`:
  `{cxr id: {pathology: {"size": [h, w], "counts": COCO RLE string}}}`, every one of the ten
  `CLASSES` (eval_constants.LOCALIZATION_TASKS) per CXR, an all-zero mask where the finding is
  absent; only CXRs with at least one positive finding are keys (187 of the 234 validation
  CXRs), so an image without findings is not in the index;
- the CheXpert images, `CheXpert/val/<patient>/<study>/<view>.jpg` and `CheXpert/test/...`,
  for the id `<patient>_<study>_<view>` (e.g. patient64622_study1_view1_frontal).

The split is the release's (val -> valid, test -> test); labels are the non-empty masks; each
row's masks are kept as their JSON text (`SourceIndex.masks`, one string per class) and
decoded by `mask`. Images differ in size, so `image_size` is None and each mask carries its
own. A CXR id not of the form patient<N>_study<N>_view<N>_<frontal|lateral>, an unknown or
missing pathology, a mask that is not a COCO RLE of the image's size, or an id in both files
is a `DataError` naming the file and the id. `root` is the folder holding `CheXlocalize/`
(and `CheXpert/`), or the `CheXlocalize` folder itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import index

NAME = "chexlocalize"
CLASSES: tuple[str, ...] = (
  "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Airspace Opacity", "Edema",
  "Consolidation", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Support Devices",
)  # fmt: skip
FILES = (
  ("gt_segmentations_val.json", "valid", "val"),
  ("gt_segmentations_test.json", "test", "test"),
)
_ID = re.compile(r"(patient\d+)_(study\d+)_(view\d+_(?:frontal|lateral))")


def rle_counts(text: str) -> list[int]:
  """The run lengths of a compressed COCO RLE string (pycocotools maskApi.c rleFrString)."""
  counts: list[int] = []
  p = 0
  while p < len(text):
    x = k = 0
    more = True
    while more:
      c = ord(text[p]) - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p, k = p + 1, k + 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    counts.append(x + counts[-2] if len(counts) > 2 else x)
  return counts


def rle_runs(rle, name="mask") -> tuple[int, int, list[int]]:
  """(h, w, run lengths) of a COCO RLE {'size': [h, w], 'counts': string or list}; a
  DataError names `name` when it is not one or its runs do not cover h x w pixels."""
  try:
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_counts(counts) if isinstance(counts, str) else [int(v) for v in counts]
  except (KeyError, TypeError, ValueError, IndexError) as e:
    raise DataError(f"{name}: not a COCO RLE {{'size': [h, w], 'counts': ...}} ({e})") from e
  if min(counts, default=0) < 0 or sum(counts) != h * w:
    raise DataError(f"{name}: its runs cover {sum(counts)} pixels, not {h}x{w}")
  return h, w, counts


def rle_mask(rle, name="mask") -> np.ndarray:
  """A COCO RLE as a boolean (h, w) mask, as pycocotools mask.decode: runs alternate from 0s,
  column-major."""
  h, w, counts = rle_runs(rle, name)
  flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
  return flat.reshape(w, h).T


def _folder(root: Path) -> Path:
  return root / "CheXlocalize" if (root / "CheXlocalize").is_dir() else root


def read(root: Path, options: index.Options) -> index.SourceIndex:
  """Reads a CheXlocalize folder; see the module docstring."""
  folder = _folder(root)
  images = root / "CheXpert" if (root / "CheXpert").is_dir() else root.parent / "CheXpert"
  ids, paths, patients, splits, labels, where = [], [], [], [], [], {}
  masks: dict[int, dict[int, tuple[str, ...]]] = {}
  for name, split, sub in FILES:
    path = folder / name
    if not path.is_file():
      raise DataError(f"{root}: no CheXlocalize/{name}")
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
      raise DataError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
      raise DataError(f"{path}: expected {{cxr id: {{pathology: COCO RLE}}}}")
    for cxr, by_cls in data.items():
      at = f"{path}: {cxr}"
      m = _ID.fullmatch(cxr)
      if m is None:
        raise DataError(f"{at}: not an id patient<N>_study<N>_view<N>_<frontal|lateral>")
      if cxr in where:
        raise DataError(f"{at}: also in {where[cxr]}")
      where[cxr] = path
      row = _row_masks(by_cls, at)
      masks[len(ids)] = {k: (text,) for k, (text, any_) in enumerate(row) if any_}
      labels.append([float(any_) for _, any_ in row])
      ids.append(cxr)
      paths.append(f"{images}/{sub}/{m[1]}/{m[2]}/{m[3]}.jpg")
      patients.append(m[1])
      splits.append(split)
  columns = {"ids": ids, "paths": paths, "patients": np.asarray(patients), "splits": splits,
             "labels": labels}  # fmt: skip
  return index.build(NAME, root, CLASSES, columns, options, official_split=True, masks=masks)


def _row_masks(by_cls, at: str) -> list[tuple[str, bool]]:
  """(JSON text, non-empty) of one CXR's ten masks, in CLASSES order; all of one size."""
  if not isinstance(by_cls, dict):
    raise DataError(f"{at}: expected {{pathology: COCO RLE}}")
  unknown = sorted(set(by_cls) - set(CLASSES))
  missing = [c for c in CLASSES if c not in by_cls]
  if unknown or missing:
    raise DataError(f"{at}: unknown pathologies {unknown}, missing {missing}")
  out, sizes = [], set()
  for c in CLASSES:
    h, w, counts = rle_runs(by_cls[c], f"{at}, {c}")  # checked, not decoded (6.6M pixels each)
    sizes.add((h, w))
    out.append((json.dumps(by_cls[c]), sum(counts[1::2]) > 0))
  if len(sizes) > 1:
    raise DataError(f"{at}: masks of different sizes {sorted(sizes)}")
  return out


def mask(source_index: index.SourceIndex, row: int, cls: int) -> np.ndarray | None:
  """Row's mask of class cls (bool (h, w)); None when the row has no non-empty mask of it."""
  texts = source_index.masks.get(row, {}).get(cls)
  if not texts:
    return None
  return rle_mask(
    json.loads(texts[0]), f"{source_index.image_ids[row]}, {source_index.classes[cls]}"
  )
