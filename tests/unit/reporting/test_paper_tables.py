"""lsemil.reporting.paper_tables and drawing: Tables 1-3 as markdown/CSV, Figures 1/3 as PNGs."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsemil.data import statistics
from lsemil.data.nih import BOX_CLASSES, CLASSES
from lsemil.reporting import drawing, paper_tables


def _md_rows(md: str) -> list[list[str]]:
  """Markdown table -> rows of stripped cells (header first, separator dropped)."""
  rows = [
    [c.strip() for c in ln.strip()[1:-1].split("|")] for ln in md.splitlines() if ln.startswith("|")
  ]
  return [rows[0]] + rows[2:]


def _num(cell: str) -> float:
  return float(cell.strip("*").split()[0])


def _runs(nan_class: str | None = "Hernia"):
  rng = np.random.default_rng(0)
  runs = []
  for r0 in (0, 5, 10):
    auc = {c: float(v) for c, v in zip(CLASSES, rng.uniform(0.6, 0.9, 14), strict=True)}
    if nan_class:
      auc[nan_class] = float("nan")
    runs.append(
      {
        "label": f"r0={r0}",
        "r0": r0,
        "auc": auc,
        "auc_lo": {c: v - 0.02 for c, v in auc.items()},
        "auc_hi": {c: v + 0.02 for c, v in auc.items()},
        "dice": {c: float(v) for c, v in zip(BOX_CLASSES, rng.uniform(0, 0.3, 8), strict=True)},
        "dice_uniform": {c: 0.1 for c in BOX_CLASSES},
        # string tau keys (a JSON round trip) and the bbox CSV's spelling 'Infiltrate'
        "iobb": {
          "Pneumonia": {"0.1": rng.random(), "0.4": rng.random()},
          "Nodule": {0.4: rng.random(), 0.8: rng.random()},
          "Infiltrate": {0.1: rng.random(), 0.8: rng.random()},
        },
      }
    )
  return runs


# ------------------------------------------------------------------------------ paper constants


def test_paper_constants_match_paper_md(paper_md):
  text = re.sub(r"</?b>", "", paper_md.read_text())
  lines = {ln.split("\t")[0]: ln.split("\t")[1:] for ln in text.splitlines() if "\t" in ln}
  for name, cells in (ln.split("\t", 1) for ln in paper_tables._PAPER_TABLE3_TEXT.splitlines()):
    assert lines[name][:7] == cells.split("\t"), name
  for r0 in (0, 5, 10):
    row = lines[f"$r_0 = {r0}$"]
    got = [paper_tables.PAPER_IOBB[f"r0={r0}"][c][t] for c, t in paper_tables._PAPER_TABLE2_COLUMNS]
    assert [float(x) for x in row if x] == got
  assert [float(x) for x in lines["[3]"] if x] == [0.3833, 0.0126, 0.4227]


def test_paper_constants_spot_values():
  assert paper_tables.PAPER_AUC["[3]"]["Hernia"] == 0.8717
  assert paper_tables.PAPER_AUC["r0=5"]["Pleural_Thickening"] == 0.715
  assert paper_tables.PAPER_MEAN_AUC == {"[3]": 0.738, "r0=0": 0.761, "r0=5": 0.760, "r0=10": 0.754}
  assert set(paper_tables.PAPER_DICE["r0=10"]) == set(BOX_CLASSES)
  assert paper_tables.PAPER_DICE["r0=5"]["Atelectasis"] == 0.240
  assert paper_tables.PAPER_IOBB["r0=10"]["Pneumonia"][0.4] == 0.0500
  assert paper_tables.PAPER_IOBB_WANG["Nodule"] == 0.0126


def test_canonical_class():
  assert paper_tables.canonical_class("Pleural thickening") == "Pleural_Thickening"
  assert paper_tables.canonical_class("infiltrate") == "Infiltration"
  assert paper_tables.display_class("Pleural_Thickening") == "Pleural thickening"
  with pytest.raises(KeyError):
    paper_tables.canonical_class("Fracture")


# ------------------------------------------------------------------------------ Table 3


def test_table3_layout_bold_paper_and_nan():
  runs = _runs()
  md, _ = paper_tables.table3(runs)
  rows = _md_rows(md)
  header, body = rows[0], rows[1:]
  assert len(header) == 1 + 4 + 3 + 3 + 3 + 1
  assert [r[0] for r in body] == [paper_tables.display_class(c) for c in CLASSES] + ["A.V.G."]
  assert all(len(r) == len(header) for r in body)
  ours_auc = [header.index(f"AUC r0={r} (ours)") for r in (0, 5, 10)]
  ours_dice = [header.index(f"DICE r0={r} (ours)") for r in (0, 5, 10)]
  for k, cls in enumerate(CLASSES[:-1]):  # Hernia is NaN
    vals = [runs[i]["auc"][cls] for i in range(3)]
    cells = [body[k][j] for j in ours_auc]
    best = int(np.argmax(vals))
    assert cells[best].startswith("**") and sum(c.startswith("**") for c in cells) == 1
    assert [_num(c) for c in cells] == pytest.approx(vals, abs=5e-4)
    lo, hi = runs[best]["auc_lo"][cls], runs[best]["auc_hi"][cls]
    assert f"[{lo:.3f}, {hi:.3f}]" in cells[best]
    # paper columns verbatim and never bold
    assert body[k][1] == paper_tables._P3_AUC["[3]"][cls]
    assert body[k][2] == paper_tables._P3_AUC["r0=0"][cls]
  for k, cls in enumerate(BOX_CLASSES):
    vals = [runs[i]["dice"][cls] for i in range(3)]
    cells = [body[k][j] for j in ours_dice]
    assert cells[int(np.argmax(vals))].startswith("**")
    assert body[k][header.index("DICE r0=5 (paper)")] == paper_tables._P3_DICE["r0=5"][cls]
    assert body[k][-1] == "0.100"  # uniform baseline, not bold
  for k in range(len(BOX_CLASSES), len(CLASSES)):
    assert body[k][ours_dice[0]] == "-" and body[k][header.index("DICE r0=0 (paper)")] == "-"
  hernia = body[CLASSES.index("Hernia")]
  assert [hernia[j] for j in ours_auc] == ["n/a"] * 3
  # mean row: over the 13 defined classes, flagged as such
  mean_row = body[-1]
  for i, j in enumerate(ours_auc):
    expected = np.mean([v for c, v in runs[i]["auc"].items() if c != "Hernia"])
    assert _num(mean_row[j]) == pytest.approx(expected, abs=5e-4)
    assert "(13/14)" in mean_row[j]
  assert mean_row[1:5] == ["0.738", "0.761", "0.760", "0.754"]


def test_table3_csv_parses_to_same_numbers():
  runs = _runs()
  _, text = paper_tables.table3(runs)
  rows = list(csv.DictReader(io.StringIO(text)))
  assert [r["abnormality"] for r in rows] == list(CLASSES) + ["A.V.G."]
  for r in rows[:-1]:
    cls = r["abnormality"]
    assert float(r["auc_paper_[3]"]) == paper_tables.PAPER_AUC["[3]"][cls]
    for run in runs:
      lb = run["label"]
      if math.isnan(run["auc"][cls]):
        assert r[f"auc_{lb}"] == ""
      else:
        assert float(r[f"auc_{lb}"]) == run["auc"][cls]
        assert float(r[f"auc_{lb}_lo"]) == run["auc_lo"][cls]
      if cls in BOX_CLASSES:
        assert float(r[f"dice_{lb}"]) == run["dice"][cls]
        assert float(r["dice_paper_r0=0"]) == paper_tables.PAPER_DICE["r0=0"][cls]
      else:
        assert r[f"dice_{lb}"] == "" and r["dice_paper_r0=0"] == ""
  assert float(rows[-1]["auc_paper_r0=5"]) == 0.760


def test_table3_sequence_auc_and_given_mean():
  run = {"label": "mine", "auc": [0.7] * 14, "mean_auc": 0.69}
  md, text = paper_tables.table3([run])
  body = _md_rows(md)[1:]
  assert body[0][5] == "0.700"  # a single run: nothing to compare, no bold
  assert body[-1][5] == "0.690"
  assert list(csv.DictReader(io.StringIO(text)))[-1]["auc_mine"] == "0.69"


# ------------------------------------------------------------------------------ Table 2


def test_table2_rows_bold_and_csv():
  runs = _runs()
  md, text = paper_tables.table2(runs)
  rows = _md_rows(md)
  header, body = rows[0], rows[1:]
  assert header[1:] == [
    "Pneumonia τ=0.1", "Pneumonia τ=0.4", "Nodule τ=0.4", "Nodule τ=0.8",
    "Infiltration τ=0.1", "Infiltration τ=0.8",
  ]  # fmt: skip
  assert [r[0] for r in body] == [
    "r0=0 (ours)", "r0=5 (ours)", "r0=10 (ours)", "r0=0 (paper)", "r0=5 (paper)",
    "r0=10 (paper)", "[3] Wang et al. (paper, τ unspecified)",
  ]  # fmt: skip
  keys = [("Pneumonia", "0.1"), ("Pneumonia", "0.4"), ("Nodule", 0.4), ("Nodule", 0.8),
          ("Infiltrate", 0.1), ("Infiltrate", 0.8)]  # fmt: skip
  for j, (cls, tau) in enumerate(keys, start=1):
    vals = [run["iobb"][cls][tau] for run in runs]
    cells = [body[i][j] for i in range(3)]
    assert cells[int(np.argmax(vals))].startswith("**")
    assert sum(c.startswith("**") for c in cells) == 1
    assert [_num(c) for c in cells] == pytest.approx(vals, abs=5e-5)
    assert not any(body[i][j].startswith("**") for i in range(3, 7))
  assert body[4][1:] == ["0.5083", "0.3500", "0.1012", "0.2025", "0.1626", "0.5284"]
  assert body[6][1:] == ["0.3833", "0.3833", "0.0126", "0.0126", "0.4227", "0.4227"]
  parsed = list(csv.reader(io.StringIO(text)))
  assert parsed[0][:2] == ["source", "run"] and len(parsed) == 1 + 7
  assert parsed[1][:2] == ["ours", "r0=0"]
  assert float(parsed[1][2]) == runs[0]["iobb"]["Pneumonia"]["0.1"]
  assert [float(x) for x in parsed[5][2:]] == [0.5083, 0.35, 0.1012, 0.2025, 0.1626, 0.5284]


def test_table2_custom_sweep_and_missing_values():
  runs = [{"label": "a", "iobb": {"Mass": {0.5: 0.25}}}, {"label": "b"}]
  md, text = paper_tables.table2(runs, classes_taus=[("Mass", (0.5, 0.9))])
  body = _md_rows(md)[1:]
  assert body == [["a (ours)", "0.2500", "-"], ["b (ours)", "-", "-"]]  # no paper rows for Mass
  assert list(csv.reader(io.StringIO(text)))[1] == ["ours", "a", "0.25", ""]


# ------------------------------------------------------------------------------ Table 1


def test_table1_from_stats_dict():
  stats = {
    "classes": {
      c: {"train": 10 * k, "valid": k, "test": 2 * k, "bbox": (k if c in BOX_CLASSES else 0)}
      for k, c in enumerate(CLASSES, start=1000)
    }
  }
  md, text = paper_tables.table1(stats)
  rows = _md_rows(md)
  assert rows[0] == ["abnormality", "train", "valid", "test", "bbox",
                     "paper train", "paper valid", "paper test", "paper bbox"]  # fmt: skip
  assert rows[1] == ["Atelectasis", "10,000", "1,000", "2,000", "1,000",
                     "6,168", "2,112", "3,255", "180"]  # fmt: skip
  hernia = rows[1 + CLASSES.index("Hernia")]
  assert hernia[4] == "-" and hernia[8] == "-" and hernia[5] == "105"
  parsed = list(csv.DictReader(io.StringIO(text)))
  assert len(parsed) == 14
  assert int(parsed[0]["train"]) == 10000 and int(parsed[0]["paper_bbox"]) == 180
  assert parsed[-1]["paper_bbox"] == "" and int(parsed[-1]["bbox"]) == 0
  assert paper_tables.table1(stats["classes"]) == (md, text)  # the bare classes dict works too


def test_real_table1_and_formats(nih, nih_expected):
  t = statistics.table1(nih)
  assert [t["classes"][c]["test"] for c in CLASSES] == nih_expected.test_positives
  assert {c: t["classes"][c]["bbox"] for c in nih_expected.boxes} == nih_expected.boxes
  assert t["images"]["all"] == 112_120 and t["boxes"] == 984 and t["box_images"] == 880
  for c in CLASSES:
    row = t["classes"][c]
    k = CLASSES.index(c)
    assert row["train"] + row["valid"] + row["test"] == int(nih.labels[:, k].sum())
  md = paper_tables.format_table1(nih, "md")
  # Ours and the paper's side by side, e.g. the Nodule row carries both 1,623 and 615.
  nodule = next(line for line in md.splitlines() if line.startswith("| Nodule"))
  assert "1,623" in nodule and "| 615 |" in nodule and "188" in md
  rows = list(csv.DictReader(io.StringIO(paper_tables.format_table1(nih, "csv"))))
  assert [int(r["test"]) for r in rows] == nih_expected.test_positives
  assert [int(r["paper_test"]) for r in rows] == [v[2] for v in paper_tables.PAPER_TABLE1.values()]
  js = json.loads(paper_tables.format_table1(nih, "json"))
  assert js["classes"] == t["classes"] and js["paper"]["Hernia"]["train"] == 105


def test_paper_table1_constant():
  assert tuple(paper_tables.PAPER_TABLE1) == CLASSES
  assert sum(v[3] for v in paper_tables.PAPER_TABLE1.values() if v[3]) == 984


# ------------------------------------------------------------------------------ figures


def _png(path: Path) -> tuple[int, int]:
  with Image.open(path) as im:
    assert im.format == "PNG"
    im.load()
    return im.size


def test_figure3_png_and_axes(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.random((128, 128))
  sal = np.zeros((8, 8))
  sal[2:4, 2:4] = 1.0
  cases = [
    {"image": img, "boxes": [(256, 256, 256, 256)], "finding": "Nodule",
     "saliency": {"r0=0": sal, "r0=5": np.full((8, 8), 0.5), "r0=10": rng.random((16, 16))}},
    {"image": img[..., None], "boxes": [(0, 0, 64, 64)], "source_size": 128,
     "saliency": {"r0=0": sal, "r0=5": sal, "r0=10": sal}, "dice": {"r0=0": 0.123}},
  ]  # fmt: skip
  fig = drawing.figure3(tmp_path / "sub" / "fig3.png", cases)
  w, h = _png(tmp_path / "sub" / "fig3.png")
  assert len(fig.axes) == 2 * 5
  assert w == pytest.approx(5 * drawing.PANEL_INCHES * drawing.DPI, rel=0.05)
  assert h == pytest.approx(2 * drawing.PANEL_INCHES * drawing.DPI, rel=0.05)
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[:2] == ["Nodule", "ground truth"]
  # the saliency exactly on the GT cell has DICE 1; a given DICE is shown as given
  assert titles[2] == "r0=0  DICE 1.000"
  assert titles[5:8] == ["image", "ground truth", "r0=0  DICE 0.123"]
  assert len(fig.axes[1].patches) == 1 and len(fig.axes[0].patches) == 0


def test_figure1_and_overlay(tmp_path):
  rng = np.random.default_rng(1)
  img = rng.random((64, 64))
  levels = [(f"level {n}", rng.random((n, n))) for n in (4, 8, 16, 32)]
  fig = drawing.figure1(tmp_path / "fig1.png", img, levels)
  assert len(fig.axes) == 5
  assert fig.axes[1].get_title() == "level 4 (4x4)"
  w, h = _png(tmp_path / "fig1.png")
  assert w > 4 * h and h >= 100
  fig = drawing.overlay_png(
    tmp_path / "o.png", img, levels[0][1], "Nodule 0.91", boxes=[(0, 0, 9, 9)]
  )
  assert len(fig.axes) == 2 and fig.axes[0].get_title() == "Nodule 0.91"
  assert len(fig.axes[0].patches) == 1
  # the colour scale of the map: 0..1, labelled
  assert fig.axes[1].get_ylabel() == "saliency" and fig.axes[1].get_ylim() == (0.0, 1.0)
  w, h = _png(tmp_path / "o.png")
  assert w == h and w >= 200


def test_overlay_boxes_of_a_non_square_file(tmp_path):
  """Boxes found in a (H, W) file land where they are on the square image shown."""
  img = np.zeros((64, 64))
  box = (100, 50, 200, 25)  # x, y, w, h in a 400 x 200 (W x H) file
  fig = drawing.overlay_png(
    tmp_path / "o.png", img, np.zeros((4, 4)), boxes=[box], source_size=(200, 400)
  )
  (rect,) = fig.axes[0].patches
  assert rect.get_xy() == (100 * 64 / 400 - 0.5, 50 * 64 / 200 - 0.5)
  assert (rect.get_width(), rect.get_height()) == (200 * 64 / 400, 25 * 64 / 200)
