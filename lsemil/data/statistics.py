"""Table 1 of the paper (Sec 4.1) as plain data: positives per class and split, boxes per class.

`lsemil stats --nih-dir D [--format md|csv|json] [--seed S]` prints it for a folder, formatted
(beside the paper's numbers) by `lsemil.reporting.paper_tables.format_table1`.
"""

from __future__ import annotations

import numpy as np

from lsemil.data.nih import CLASSES, SPLITS, NihIndex


def table1(index: NihIndex) -> dict:
  """Table 1 of `index` as plain data.

  Returns:
    {"classes": {class: {"train", "valid", "test", "bbox"}}, "images": {split: n, "all": n},
     "patients": {split: n, "all": n}, "boxes": box rows, "box_images": images with a box,
     "kind": index.kind, "official_split": bool, "seed": int}.
  """
  positives = {s: index.labels[index.rows(s)].sum(axis=0) for s in SPLITS}
  boxes = np.bincount(index.box_classes, minlength=len(CLASSES))
  classes = {
    c: {**{s: int(positives[s][k]) for s in SPLITS}, "bbox": int(boxes[k])}
    for k, c in enumerate(CLASSES)
  }
  return {
    "classes": classes,
    "images": {**{s: len(index.rows(s)) for s in SPLITS}, "all": len(index)},
    "patients": {**{s: len(index.patients(s)) for s in SPLITS}, "all": len(index.patients())},
    "boxes": len(index.box_rows),
    "box_images": len(np.unique(index.box_rows)),
    "kind": index.kind,
    "official_split": index.official_split,
    "seed": index.seed,
  }
