"""Table 1 of the paper (Sec 4.1) as plain data: positives per class and split, boxes per class.

`source_table` / `format_source_table`: the same counts, plus unknown labels, for any source's
`lsemil.data.index.SourceIndex` (`lsemil stats --source S`).

`lsemil stats --nih-dir D [--format md|csv|json] [--seed S]` prints it for a folder, formatted
(beside the paper's numbers) by `lsemil.reporting.paper_tables.format_table1`.
"""

from __future__ import annotations

import json

import numpy as np

from lsemil.core import tables
from lsemil.data.index import SourceIndex
from lsemil.data.nih import CLASSES, SPLITS, NihIndex

FORMATS = ("md", "csv", "json")  # of `format_source_table`, and of Table 1 (paper_tables)


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


def source_table(index: SourceIndex) -> dict:
  """Positives, unknown labels and boxes per class and split of any source's index.

  Returns:
    {"source", "classes": {class: {"train", "valid", "test", "unknown", "boxes"}} (positives
     per split; labels NaN under the chosen policies; box rows), "images": {split: n, "all"},
     "patients": {split: n, "all"}, "boxes", "box_images", "mask_images", "missing" (images
     without a file), "official_split", "seed"}.
  """
  positives = {s: (index.labels[index.rows(s)] == 1).sum(axis=0) for s in SPLITS}
  unknown = np.isnan(index.labels).sum(axis=0)
  boxes = np.bincount(index.box_classes, minlength=len(index.classes))
  classes = {
    c: {**{s: int(positives[s][k]) for s in SPLITS}, "unknown": int(unknown[k]),
        "boxes": int(boxes[k])}
    for k, c in enumerate(index.classes)
  }
  return {
    "source": index.source,
    "classes": classes,
    "images": {**{s: len(index.rows(s)) for s in SPLITS}, "all": len(index)},
    "patients": {**{s: len(index.patients(s)) for s in SPLITS}, "all": len(index.patients())},
    "boxes": len(index.box_rows),
    "box_images": len(np.unique(index.box_rows)),
    "mask_images": len(index.masks),
    "missing": len(index.missing),
    "official_split": index.official_split,
    "seed": index.seed,
  }


def format_source_table(index: SourceIndex, fmt: str = "md") -> str:
  """`source_table(index)` as markdown (with totals below), CSV or JSON."""
  t = source_table(index)
  if fmt == "json":
    return json.dumps(t, indent=2) + "\n"
  header = ["class", *SPLITS, "unknown", "boxes"]
  rows = [[c, *(v[k] for k in header[1:])] for c, v in t["classes"].items()]
  if fmt == "csv":
    return tables.csv_text(header, rows)
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  im, pa = t["images"], t["patients"]
  split = "official split" if t["official_split"] else f"patient-wise split, seed {t['seed']}"
  lines = [
    f"{t['source']} ({index.root}; {split}): positives per class and split",
    "",
    tables.markdown(header, [[f"{v:,}" if isinstance(v, int) else v for v in r] for r in rows])
    .rstrip("\n"),
    "",
    f"images: {im['all']:,} (train {im['train']:,}, valid {im['valid']:,}, test {im['test']:,})",
    f"patients: {pa['all']:,} (train {pa['train']:,}, valid {pa['valid']:,}, test {pa['test']:,})",
    f"boxes: {t['boxes']:,} on {t['box_images']:,} images; masks on {t['mask_images']:,} images",
    f"images without a file: {t['missing']:,}",
  ]
  return "\n".join(lines) + "\n"
