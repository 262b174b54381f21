"""Table 1 of the paper (Section 4.1): positives per class and split, and boxes per class.

`lsemil stats --nih-dir D [--format md|csv|json] [--seed S]` prints the table for a folder.
The markdown output prints the paper's numbers (`PAPER_TABLE1`) beside ours: they differ from
the Data_Entry_2017_v2020 CSV in a few classes, as NIH relabelled 188 entries in November 2017,
and our validation split is drawn anew (the paper's own draw was not published).
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping

import numpy as np

from lsemil.core import tables
from lsemil.data.nih import CLASSES, SPLITS, VALID_FRACTION, NihIndex

# Paper Table 1: (train, valid, test, bbox) per class in NIH order; bbox None where it has '-'.
PAPER_TABLE1: Mapping[str, tuple[int, int, int, int | None]] = types.MappingProxyType(
  {
    "Atelectasis": (6168, 2112, 3255, 180),
    "Cardiomegaly": (1273, 434, 1065, 146),
    "Effusion": (6537, 2122, 4648, 153),
    "Infiltration": (10244, 3538, 6088, 123),
    "Mass": (3012, 1022, 1712, 85),
    "Nodule": (3501, 1207, 615, 79),
    "Pneumonia": (655, 221, 477, 120),
    "Pneumothorax": (1939, 698, 2661, 98),
    "Consolidation": (2114, 738, 1815, None),
    "Edema": (1027, 361, 925, None),
    "Emphysema": (1075, 348, 1093, None),
    "Fibrosis": (963, 288, 435, None),
    "Pleural_Thickening": (1693, 549, 1143, None),
    "Hernia": (105, 36, 86, None),
  }
)
# Section 4.1 totals.
PAPER_IMAGES = 112_120
PAPER_PATIENTS = 30_805
FORMATS = ("md", "csv", "json")


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


def _paper_cell(v: int | None) -> str:
  return "-" if v is None else f"{v:,}"


def table1_tables(classes: Mapping, *, with_paper: bool, display=str) -> tuple[str, str]:
  """Table 1 rows {class: {train, valid, test, bbox}} as (Markdown, CSV), the paper's counts
  beside ours when `with_paper`; `display` names the classes in the Markdown."""
  cols = ("train", "valid", "test", "bbox")
  head = ["abnormality", *cols] + ([f"paper {c}" for c in cols] if with_paper else [])
  csv_head = ["abnormality", *cols] + ([f"paper_{c}" for c in cols] if with_paper else [])
  md_rows, csv_rows = [], []
  for c, row in classes.items():
    ours = [row.get(k) for k in cols]
    paper = list(PAPER_TABLE1[c]) if with_paper else []
    md_rows.append(
      [display(c)]
      + [
        "-" if (v is None or (k == "bbox" and not v)) else f"{int(v):,}"
        for k, v in zip(cols, ours, strict=True)
      ]
      + [_paper_cell(v) for v in paper]
    )
    csv_rows.append([c] + ["" if v is None else int(v) for v in ours + paper])
  return tables.markdown(head, md_rows), tables.csv_text(csv_head, csv_rows)


def format_table1(index: NihIndex, fmt: str = "md") -> str:
  """Table 1 of `index` as markdown (with the paper's numbers beside ours), CSV or JSON."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  t = table1(index)
  with_paper = index.kind == "nih"
  if fmt == "json":
    if with_paper:
      t["paper"] = {
        c: dict(zip(("train", "valid", "test", "bbox"), v, strict=True))
        for c, v in PAPER_TABLE1.items()
      }
    return json.dumps(t, indent=2)
  md, csv_text = table1_tables(t["classes"], with_paper=with_paper)
  if fmt == "csv":
    return csv_text
  split = "official lists" if t["official_split"] else "patient-wise fallback"
  lines = [
    f"Table 1 ({index.root}, {t['kind']}; test from {split}, valid = "
    f"{VALID_FRACTION:.0%} of train_val patients, seed {t['seed']})",
    "",
    md.rstrip("\n"),
  ]
  im, pa = t["images"], t["patients"]
  lines += [
    "",
    f"images: {im['all']:,} (train {im['train']:,}, valid {im['valid']:,}, test {im['test']:,})",
    f"patients: {pa['all']:,} (train {pa['train']:,}, valid {pa['valid']:,}, test {pa['test']:,})",
    f"boxes: {t['boxes']:,} on {t['box_images']:,} images",
  ]
  if with_paper:
    lines += [
      f"paper: {PAPER_IMAGES:,} images, {PAPER_PATIENTS:,} patients. Its counts differ from the "
      "v2020 CSV in a few classes (NIH relabelled 188 entries in November 2017), and its "
      "train/valid draw was not published.",
    ]
  return "\n".join(lines) + "\n"
