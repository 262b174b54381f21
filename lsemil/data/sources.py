"""The registry of chest X-ray sources: a name -> the reader that turns its folder into a
`lsemil.data.index.SourceIndex`.

`load(name, data_dir, **options)` reads one folder; `READERS` lists the names. `nih` is
`lsemil.data.nih.load_index` unchanged (its `NihIndex` stays what training and evaluation
read), seen through `from_nih`: the same rows, splits, boxes and notes, labels as float32.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError
from lsemil.data import (
  catalog,
  chestx_det10,
  chexlocalize_truth,
  chexpert,
  index,
  mimic,
  nih,
  rsna,
  siim,
  vindr,
)


def from_nih(nih_index: nih.NihIndex) -> index.SourceIndex:
  """An `NihIndex` as a `SourceIndex` (no new reading; an image without a file keeps the
  path where `images/` would hold it and is named in `missing`)."""
  root = nih_index.root
  paths = tuple(os.fspath(p or root / "images" / i) for i, p in
                zip(nih_index.image_ids, nih_index.image_paths, strict=True))
  missing = tuple(i for i, p in zip(nih_index.image_ids, nih_index.image_paths, strict=True)
                  if p is None)
  return index.SourceIndex(
    source="nih",
    root=root,
    classes=nih.CLASSES,
    image_ids=nih_index.image_ids,
    image_paths=paths,
    patient_ids=nih_index.patient_ids.astype(str),
    splits=nih_index.splits,
    labels=nih_index.labels.astype(np.float32),
    box_rows=nih_index.box_rows,
    box_classes=nih_index.box_classes,
    box_xywh=nih_index.box_xywh,
    official_split=nih_index.official_split,
    seed=nih_index.seed,
    image_size=(nih_index.box_space, nih_index.box_space),
    missing=missing,
    warnings=nih_index.warnings,
  )


def _nih(root: Path, options: index.Options) -> index.SourceIndex:
  return from_nih(nih.load_index(root, seed=options.seed, val_fraction=options.val_fraction))


Reader = Callable[[Path, index.Options], index.SourceIndex]
READERS: Mapping[str, Reader] = types.MappingProxyType({
  "nih": _nih,
  chexpert.NAME: chexpert.read,
  catalog.NAME: catalog.read,
  rsna.NAME: rsna.read,
  siim.NAME: siim.read,
  mimic.NAME: mimic.read,
  vindr.NAME: vindr.read,
  chestx_det10.NAME: chestx_det10.read,
  chexlocalize_truth.NAME: chexlocalize_truth.read,
})


def load(source: str, data_dir: str | os.PathLike, **options) -> index.SourceIndex:
  """Reads `data_dir` with the reader of `source`; `options` are `index.Options` fields.

  Raises:
    DataError: an unknown source, a missing folder, or the first bad row (file and line).
  """
  if source not in READERS:
    raise DataError(f"unknown source {source!r}; expected one of {', '.join(READERS)}")
  nih.require_local(data_dir)
  root = Path(data_dir)
  if not root.is_dir():
    raise DataError(f"{root}: not a folder")
  return READERS[source](root, index.Options(**options))
