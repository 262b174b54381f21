"""The paper's tables from plain result dicts (Yao et al. 2018, Sec 4.1-4.3), and Table 4.

No JAX and no checkpoints: `lsemil evaluate` / `lsemil reproduce` compute `RunResult` dicts
(from `lsemil.metrics`) and call these formatters; the figures are `lsemil.reporting.drawing`.

  * `table1(stats)`, `format_table1(index, fmt)` - Table 1 (positives per class and split,
    boxes) beside the paper's; the second is `lsemil stats`'s Markdown / CSV / JSON output.
  * `table2(runs)` - Table 2: IoBB accuracy at T(IoBB) = 0.5 for several binarization
    thresholds tau, our runs as rows above the paper's rows (r0 = 0/5/10 and Wang et al. [3]).
  * `table3(runs)` - Table 3: per-class AUC (with bootstrap CI) and DICE of the 8 box classes,
    our runs beside the paper's columns, plus the uniform-map DICE baseline.
  * `table4_rows(results_by_source)` - beyond the paper: the weak-localization protocols of
    `lsemil.metrics.localization.score_all`, classes x protocols, one row per source.
  * `spread_table(groups)`, `calibration_table(runs)` - beyond the paper: mean ± sd and the
    per-seed values over several seeds per label; ECE and Brier score per run.

Tables 1-3 and the spread and calibration tables return (markdown, csv); `table4_rows` returns
the rows too. Bold in markdown marks the best of OUR runs only (per row in Table 3, per column
in Table 2; ties displayed equal are all bold); the paper's numbers are shown for reference in
columns / rows labelled "paper" and are never bold, and the uniform-map baseline is not a
competitor for bold. CSV cells hold full-precision numbers, empty
where a value is missing or undefined; markdown shows 'n/a' for an undefined value (e.g. an AUC
of a class without positives, which is also left out of our mean) and '-' for a value that does
not exist (DICE of a class without boxes).
"""

from __future__ import annotations

import json
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from lsemil.core import fileio, tables
from lsemil.data import statistics
from lsemil.data.nih import BOX_CLASSES, CLASSES, VALID_FRACTION, NihIndex
from lsemil.metrics import classification


class RunResult(TypedDict, total=False):
  """What one trained model scored on the test split; every key but `label` is optional.

  Class-keyed values use the NIH names of `lsemil.data.nih.CLASSES` ('Pleural_Thickening';
  'Pleural thickening' and 'Infiltrate' are accepted too). Per-class AUC values may also be a
  sequence of 14 in `CLASSES` order. Tau keys may be floats or strings (after a JSON round trip).
  """

  label: str  # column / row label, e.g. 'r0=5'; 'r0=0', 'r0=5', 'r0=10' match the paper's
  r0: float  # LSE-LBA sharpness prior of the run (Sec 3.4)
  auc: Mapping[str, float] | Sequence[float]  # 14 test AUCs, NaN where undefined
  auc_lo: Mapping[str, float] | Sequence[float]  # bootstrap CI lower bounds (patients)
  auc_hi: Mapping[str, float] | Sequence[float]  # and upper bounds
  mean_auc: float  # mean over defined classes (classification.mean_auc); from auc if absent
  dice: Mapping[str, float]  # mean continuous DICE over the test boxes of each box class
  dice_uniform: Mapping[str, float]  # the same for the uniform-map baseline (overlap.uniform_dice)
  iobb: Mapping[str, Mapping[float, float]]  # {class: {tau: accuracy at T(IoBB) = 0.5}}
  table1: Mapping  # lsemil.data.statistics.table1(index) of the data the run was evaluated on
  # Several seeds of one label (`lsemil reproduce --run r0=5:Wa --run r0=5:Wb`): auc, dice,
  # mean_auc are means over the seeds and these their standard deviations (ddof 1).
  n_seeds: int
  auc_sd: Mapping[str, float]
  dice_sd: Mapping[str, float]
  mean_auc_sd: float


# ----------------------------------------------------------------------------------------------
# The paper's numbers, copied verbatim from Tables 1-3 (bold tags dropped).

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

_PAPER_TABLE2_TEXT = """\
r0=0	0.3334	0.3167	0.0506	0.1645	0.1382	0.4634
r0=5	0.5083	0.3500	0.1012	0.2025	0.1626	0.5284
r0=10	0.4416	0.0500	0.1772	0.2152	0.1220	0.3008
[3]	0.3833		0.0126		0.4227
"""
_PAPER_TABLE2_COLUMNS = (
  ("Pneumonia", 0.1),
  ("Pneumonia", 0.4),
  ("Nodule", 0.4),
  ("Nodule", 0.8),
  ("Infiltration", 0.1),
  ("Infiltration", 0.8),
)

_PAPER_TABLE3_TEXT = """\
Atelectasis	0.7003	0.733	0.728	0.724	0.204	0.240	0.211
Cardiomegaly	0.8100	0.856	0.858	0.854	0.180	0.114	0.076
Effusion	0.7585	0.806	0.803	0.795	0.293	0.294	0.242
Infiltration	0.6614	0.673	0.675	0.668	0.325	0.312	0.286
Nodule	0.6687	0.718	0.724	0.727	0.202	0.238	0.196
Mass	0.6933	0.777	0.777	0.778	0.295	0.295	0.241
Pneumonia	0.6580	0.684	0.690	0.687	0.112	0.104	0.072
Pneumothorax	0.7993	0.805	0.791	0.763	0.039	0.023	0.028
Consolidation	0.7032	0.711	0.714	0.717	-	-	-
Edema	0.8052	0.806	0.804	0.801	-	-	-
Emphysema	0.8330	0.842	0.822	0.771	-	-	-
Fibrosis	0.7859	0.743	0.757	0.731	-	-	-
Pleural thickening	0.6835	0.724	0.715	0.712	-	-	-
Hernia	0.8717	0.775	0.764	0.824	-	-	-
A.V.G.	0.738	0.761	0.760	0.754	-	-	-
"""
PAPER_RUNS = ("r0=0", "r0=5", "r0=10")  # the paper's three models
WANG = "[3]"  # Wang et al. 2017 (ChestX-ray8), the paper's reference [3]
MEAN_ROW = "A.V.G."


def canonical_class(name: str) -> str:
  """'Pleural thickening' / 'pleural_thickening' / 'Infiltrate' -> the NIH name in CLASSES."""
  key = name.strip().lower().replace(" ", "_")
  key = {"infiltrate": "infiltration"}.get(key, key)
  for c in CLASSES:
    if c.lower() == key:
      return c
  raise KeyError(f"unknown class {name!r}; expected one of {CLASSES}")


def display_class(name: str) -> str:
  """The paper's spelling of a class: 'Pleural_Thickening' -> 'Pleural thickening'."""
  return name.replace("_", " ").capitalize() if "_" in name else name


def _parse_table3() -> tuple[dict, dict, dict]:
  auc_cols, dice_cols = (WANG, *PAPER_RUNS), PAPER_RUNS
  auc = {c: {} for c in auc_cols}
  dice = {c: {} for c in dice_cols}
  mean = {}
  for line in _PAPER_TABLE3_TEXT.splitlines():
    name, *cells = line.split("\t")
    if name == MEAN_ROW:
      mean = dict(zip(auc_cols, cells[:4], strict=True))
      continue
    cls = canonical_class(name)
    for col, cell in zip(auc_cols, cells[:4], strict=True):
      auc[col][cls] = cell
    for col, cell in zip(dice_cols, cells[4:], strict=True):
      if cell != "-":
        dice[col][cls] = cell
  return auc, dice, mean


def _parse_table2() -> tuple[dict, dict]:
  runs = {}
  wang = {}
  for line in _PAPER_TABLE2_TEXT.splitlines():
    name, *cells = line.split("\t")
    cells += [""] * (len(_PAPER_TABLE2_COLUMNS) - len(cells))  # the [3] row's empty last cell
    if name == WANG:
      for (cls, _), cell in zip(_PAPER_TABLE2_COLUMNS, cells, strict=True):
        if cell:
          wang[cls] = cell
      continue
    runs[name] = {}
    for (cls, tau), cell in zip(_PAPER_TABLE2_COLUMNS, cells, strict=True):
      runs[name].setdefault(cls, {})[tau] = cell
  return runs, wang


_P3_AUC, _P3_DICE, _P3_MEAN = _parse_table3()
_P2_RUNS, _P2_WANG = _parse_table2()


def _floats(d):
  return {k: _floats(v) for k, v in d.items()} if isinstance(d, dict) else float(d)


# Public float views: {column: {class: value}}; columns '[3]', 'r0=0', 'r0=5', 'r0=10'.
PAPER_AUC: dict[str, dict[str, float]] = _floats(_P3_AUC)
PAPER_MEAN_AUC: dict[str, float] = _floats(_P3_MEAN)
PAPER_DICE: dict[str, dict[str, float]] = _floats(_P3_DICE)
# {run: {class: {tau: accuracy}}} and Wang et al.'s single value per class (tau unspecified).
PAPER_IOBB: dict[str, dict[str, dict[float, float]]] = _floats(_P2_RUNS)
PAPER_IOBB_WANG: dict[str, float] = _floats(_P2_WANG)
TABLE2_CLASSES = BOX_CLASSES  # the classes of the paper's Table 2: NIH's 8 with boxes
# Table 2's sweep: (class, taus) in the paper's column order.
DEFAULT_CLASSES_TAUS: tuple[tuple[str, tuple[float, ...]], ...] = (
  ("Pneumonia", (0.1, 0.4)),
  ("Nodule", (0.4, 0.8)),
  ("Infiltration", (0.1, 0.8)),
)


# ----------------------------------------------------------------------------------------------
# Helpers


def _by_class(values) -> dict[str, float]:
  """A class-keyed mapping or a 14-sequence in CLASSES order -> {NIH name: float}."""
  if values is None:
    return {}
  if isinstance(values, Mapping):
    return {canonical_class(k): float(v) for k, v in values.items()}
  values = list(values)
  if len(values) != len(CLASSES):
    raise ValueError(f"expected {len(CLASSES)} per-class values, got {len(values)}")
  return {c: float(v) for c, v in zip(CLASSES, values, strict=True)}


def _tau_value(table: Mapping, tau: float) -> float | None:
  for k, v in table.items():
    if math.isclose(float(k), tau, abs_tol=1e-9):
      return float(v)
  return None


def _defined(v) -> bool:
  return v is not None and not (isinstance(v, float) and math.isnan(v))


def _md_num(v, digits: int) -> str:
  if v is None:
    return "-"
  if isinstance(v, str):  # a paper cell, verbatim
    return v
  return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def _csv_num(v) -> str:
  if v is None:
    return ""
  if isinstance(v, str):
    return v
  return "" if math.isnan(v) else repr(float(v))


def _bold_best(cells: list[str], values: list, digits: int) -> list[str]:
  """Bold the cells whose value, rounded as displayed, equals the best (max) defined value."""
  shown = [round(v, digits) if _defined(v) else None for v in values]
  defined = [v for v in shown if v is not None]
  if len(defined) < 2:  # a single competitor is not "best of" anything
    return cells
  best = max(defined)
  return [f"**{c}**" if s == best else c for c, s in zip(cells, shown, strict=True)]


def _label(run: Mapping) -> str:
  if "label" in run:
    return str(run["label"])
  if "r0" in run:
    return f"r0={float(run['r0']):g}"
  raise ValueError("a RunResult needs a 'label' (or an 'r0')")


# ----------------------------------------------------------------------------------------------
# Tables


def table1(stats: Mapping) -> tuple[str, str]:
  """Table 1 (Sec 4.1) beside the paper's: positives per class in train/valid/test and boxes.

  stats: `lsemil.data.statistics.table1(index)` (uses its "classes" entry) or directly
  {class: {"train", "valid", "test", "bbox"}}. A bbox count of 0 or None shows as '-'.
  """
  classes = {canonical_class(k): v for k, v in stats.get("classes", stats).items()}
  return _table1_tables(classes, with_paper=True, display=display_class)


def _paper_cell(v: int | None) -> str:
  return "-" if v is None else f"{v:,}"


def _table1_tables(classes: Mapping, *, with_paper: bool, display=str) -> tuple[str, str]:
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


TABLE1_FORMATS = ("md", "csv", "json")


def format_table1(index: NihIndex, fmt: str = "md") -> str:
  """Table 1 of `index` as markdown (with the paper's numbers beside ours), CSV or JSON."""
  if fmt not in TABLE1_FORMATS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {TABLE1_FORMATS}")
  t = statistics.table1(index)
  with_paper = index.kind == "nih"
  if fmt == "json":
    if with_paper:
      t["paper"] = {
        c: dict(zip(("train", "valid", "test", "bbox"), v, strict=True))
        for c, v in PAPER_TABLE1.items()
      }
    return json.dumps(t, indent=2)
  md, csv_text = _table1_tables(t["classes"], with_paper=with_paper)
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


def table2(
  runs: Sequence[RunResult],
  classes_taus: Sequence[tuple[str, Sequence[float]]] = DEFAULT_CLASSES_TAUS,
  t: float = 0.5,
) -> tuple[str, str]:
  """Table 2 (Sec 4.2): IoBB accuracy at T(IoBB) = t per (class, tau), runs as rows.

  Our runs come first ("<label> (ours)"), then the paper's rows where it reported that
  (class, tau) ("<r0> (paper)"), and Wang et al. [3] whose single value per class (tau
  unspecified) is repeated under each tau of the class. Bold: per column, the best of our runs.
  CSV: one row per run, columns 'source', 'run', then '<class>@tau=<tau>'.
  """
  cols = [(canonical_class(c), float(tau)) for c, taus in classes_taus for tau in taus]
  header = [f"T(IoBB)={t:g}"] + [f"{display_class(c)} τ={tau:g}" for c, tau in cols]
  ours = []
  for run in runs:
    table = {canonical_class(k): v for k, v in (run.get("iobb") or {}).items()}
    ours.append((_label(run), [_tau_value(table.get(c, {}), tau) for c, tau in cols]))
  md_cols = [[_md_num(v, 4) for v in vals] for _, vals in ours]
  for j in range(len(cols)):  # bold per column among our runs
    bolded = _bold_best([r[j] for r in md_cols], [vals[j] for _, vals in ours], 4)
    for r, b in zip(md_cols, bolded, strict=True):
      r[j] = b
  md_rows = [[f"{label} (ours)", *cells] for (label, _), cells in zip(ours, md_cols, strict=True)]
  csv_rows = [["ours", label, *(_csv_num(v) for v in vals)] for label, vals in ours]
  paper_rows = [
    (r, [_tau_value(_P2_RUNS[r].get(c, {}), tau) for c, tau in cols]) for r in PAPER_RUNS
  ]
  paper_rows.append((WANG, [_P2_WANG.get(c) for c, _ in cols]))
  for name, cells in paper_rows:
    if t != 0.5 or all(v is None for v in cells):
      continue  # the paper reports T(IoBB) = 0.5 only
    label = f"{name} Wang et al. (paper, τ unspecified)" if name == WANG else f"{name} (paper)"
    md_rows.append([label] + [_md_num(v, 4) for v in cells])
    csv_rows.append(["paper", name] + [_csv_num(v) for v in cells])
  csv_header = ["source", "run"] + [f"{c}@tau={tau:g}" for c, tau in cols]
  return tables.markdown(header, md_rows), tables.csv_text(csv_header, csv_rows)


def _significance_cells(significance: Mapping | None, labels: Sequence[str]):
  """(bold sets {test: {label: set(classes)}}, CSV columns [(name, {class: p})]) of a
  `significance.compare_runs` result; (None, []) without one."""
  if significance is None:
    return None, []
  bold, cols = {}, []
  for test in ("auc", "dice"):
    part = significance.get(test)
    if not part:
      bold[test] = {lb: set() for lb in labels}
      continue
    bold[test] = {lb: {canonical_class(c) for c in part["bold"].get(lb, ())} for lb in labels}
    for pair in part["pairs"]:
      for key in ("p", "p_holm"):
        by_cls = {canonical_class(c): v for c, v in pair[key].items()}
        cols.append((f"{key}_{test}_{pair['a']}_vs_{pair['b']}", by_cls))
  return bold, cols


def _bold_significant(cells, values, digits, allowed: Sequence[bool] | None) -> list[str]:
  """`_bold_best`, restricted (when `allowed` is given) to the cells a test allows."""
  bolded = _bold_best(cells, values, digits)
  if allowed is None:
    return bolded
  return [b if ok else c for b, c, ok in zip(bolded, cells, allowed, strict=True)]


def _with_sd(cell: str, v, sd) -> str:
  return f"{cell} ± {sd:.3f}" if _defined(v) and _defined(sd) else cell


def table3(runs: Sequence[RunResult], significance: Mapping | None = None) -> tuple[str, str]:
  """Table 3 (Sec 4.3): AUC of the 14 classes and DICE of the 8 box classes.

  Columns: AUC of [3] and of the paper's r0 = 0/5/10 ("paper"), our AUC per run ("ours", with
  its bootstrap 95% CI in brackets when given), the paper's DICE for r0 = 0/5/10, our DICE per
  run, and the uniform-map DICE baseline (from the first run that has it; it depends on the
  ground truth only). Rows: the 14 classes and 'A.V.G.': the mean AUC over our classes with a
  defined AUC (a class shown 'n/a' is left out; the row notes how many classes entered) and our
  mean DICE over the box classes with a value. Bold: per row, the best of our runs, separately
  for AUC and for DICE.

  `significance` (a `lsemil.metrics.significance.compare_runs` result over the same labels) makes
  bold mean significantly best: a cell is bold only where it is the displayed best AND the
  test bolds it (`significance.BOLD_RULE`; the mean row is not tested and never bold), and the
  CSV gains 'p_<test>_<a>_vs_<b>' and 'p_holm_<test>_<a>_vs_<b>' columns (test auc / dice).
  A run with 'auc_sd' / 'dice_sd' (several seeds) shows 'mean ± sd' instead of the CI, and
  the CSV gains 'auc_<label>_sd' / 'dice_<label>_sd'.

  CSV columns: 'abnormality', 'auc_paper_<col>', 'auc_<label>' (+ '_lo', '_hi'),
  'dice_paper_<col>', 'dice_<label>', 'dice_uniform'.
  """
  labels = [_label(r) for r in runs]
  aucs = [_by_class(r.get("auc")) for r in runs]
  los = [_by_class(r.get("auc_lo")) for r in runs]
  his = [_by_class(r.get("auc_hi")) for r in runs]
  dices = [_by_class(r.get("dice")) for r in runs]
  auc_sds = [_by_class(r.get("auc_sd")) for r in runs]
  dice_sds = [_by_class(r.get("dice_sd")) for r in runs]
  with_sd = any(r.get("auc_sd") or r.get("dice_sd") for r in runs)
  uniform = next((_by_class(r["dice_uniform"]) for r in runs if r.get("dice_uniform")), {})
  auc_paper_cols = (WANG, *PAPER_RUNS)
  bold_sets, p_cols = _significance_cells(significance, labels)

  header = (
    ["abnormality"]
    + [f"AUC {c} (paper)" for c in auc_paper_cols]
    + [f"AUC {lb} (ours)" for lb in labels]
    + [f"DICE {c} (paper)" for c in PAPER_RUNS]
    + [f"DICE {lb} (ours)" for lb in labels]
    + ["DICE uniform (ours)"]
  )
  csv_header = (
    ["abnormality"]
    + [f"auc_paper_{c}" for c in auc_paper_cols]
    + [x for lb in labels for x in (f"auc_{lb}", f"auc_{lb}_lo", f"auc_{lb}_hi")]
    + [f"dice_paper_{c}" for c in PAPER_RUNS]
    + [f"dice_{lb}" for lb in labels]
    + ["dice_uniform"]
    + ([f"{x}_{lb}_sd" for x in ("auc", "dice") for lb in labels] if with_sd else [])
    + [name for name, _ in p_cols]
  )

  def auc_cell(i: int, cls: str) -> str:
    v = aucs[i].get(cls)
    cell = _md_num(v, 3)
    lo, hi = los[i].get(cls), his[i].get(cls)
    if _defined(auc_sds[i].get(cls)):
      return _with_sd(cell, v, auc_sds[i][cls])
    if _defined(v) and _defined(lo) and _defined(hi):
      cell += f" [{lo:.3f}, {hi:.3f}]"
    return cell

  def allowed(test: str, cls: str) -> list[bool] | None:
    if bold_sets is None:
      return None
    return [cls in bold_sets[test][lb] for lb in labels]

  md_rows, csv_rows = [], []
  for cls in CLASSES:
    box = cls in BOX_CLASSES
    our_auc = [a.get(cls) for a in aucs]
    our_dice = [d.get(cls) if box else None for d in dices]
    auc_cells = _bold_significant(
      [auc_cell(i, cls) for i in range(len(runs))], our_auc, 3, allowed("auc", cls)
    )
    dice_md = [_with_sd(_md_num(v, 3), v, dice_sds[i].get(cls)) for i, v in enumerate(our_dice)]
    dice_cells = _bold_significant(dice_md, our_dice, 3, allowed("dice", cls))
    md_rows.append(
      [display_class(cls)]
      + [_P3_AUC[c][cls] for c in auc_paper_cols]
      + auc_cells
      + [_P3_DICE[c].get(cls, "-") for c in PAPER_RUNS]
      + dice_cells
      + [_md_num(uniform.get(cls) if box else None, 3)]
    )
    csv_rows.append(
      [cls]
      + [_P3_AUC[c][cls] for c in auc_paper_cols]
      + [
        _csv_num(x)
        for i in range(len(runs))
        for x in (our_auc[i], los[i].get(cls), his[i].get(cls))
      ]
      + [_P3_DICE[c].get(cls, "") for c in PAPER_RUNS]
      + [_csv_num(v) for v in our_dice]
      + [_csv_num(uniform.get(cls) if box else None)]
      + (
        [_csv_num(a.get(cls)) for a in auc_sds]
        + [_csv_num(d.get(cls) if box else None) for d in dice_sds]
        if with_sd
        else []
      )
      + [_csv_num(by_cls.get(cls)) for _, by_cls in p_cols]
    )

  # Mean row.
  means, notes = [], []
  for run, a in zip(runs, aucs, strict=True):
    vals = [a.get(c, float("nan")) for c in CLASSES]
    mean, missing = classification.mean_auc(vals) if a else (float("nan"), [])
    if run.get("mean_auc") is not None:
      mean = float(run["mean_auc"])
    means.append(mean)
    notes.append(f" ({len(CLASSES) - len(missing)}/{len(CLASSES)})" if missing and a else "")

  def mean_dice(d: Mapping[str, float]) -> float | None:
    vals = [d[c] for c in BOX_CLASSES if _defined(d.get(c))]
    return float(np.mean(vals)) if vals else None

  our_mdice = [mean_dice(d) for d in dices]
  untested = None if bold_sets is None else [False] * len(runs)  # the mean row has no test
  mean_sds = [run.get("mean_auc_sd") for run in runs]
  mean_auc_cells = _bold_significant(
    [_with_sd(_md_num(m, 3), m, sd) + n for m, sd, n in zip(means, mean_sds, notes, strict=True)],
    means,
    3,
    untested,
  )
  md_rows.append(
    [MEAN_ROW]
    + [_P3_MEAN[c] for c in auc_paper_cols]
    + mean_auc_cells
    + ["-"] * len(PAPER_RUNS)
    + _bold_significant([_md_num(v, 3) for v in our_mdice], our_mdice, 3, untested)
    + [_md_num(mean_dice(uniform), 3)]
  )
  csv_rows.append(
    [MEAN_ROW]
    + [_P3_MEAN[c] for c in auc_paper_cols]
    + [x for m in means for x in (_csv_num(m), "", "")]
    + [""] * len(PAPER_RUNS)
    + [_csv_num(v) for v in our_mdice]
    + [_csv_num(mean_dice(uniform))]
    + ([_csv_num(sd) for sd in mean_sds] + [""] * len(runs) if with_sd else [])
    + [""] * len(p_cols)
  )
  return tables.markdown(header, md_rows), tables.csv_text(csv_header, csv_rows)


# ----------------------------------------------------------------------------------------------
# Table 4


# Table 4's columns: cheXlocalize's protocols first, exactly as its official code computes them
# (`lsemil score`'s `workflows.scoring.score`), then `lsemil.metrics.localization.score_all`'s.
TABLE4_CHEXLOCALIZE: tuple[str, ...] = (
  "chexlocalize_miou_otsu",
  "chexlocalize_miou_tuned",
  "chexlocalize_hit_rate",
)
TABLE4_PROTOCOLS: tuple[str, ...] = (
  *TABLE4_CHEXLOCALIZE,
  "dice",
  "acc_iobb@0.5",
  "afp_iobb@0.5",
  "acc_iou@0.25",
  "energy",
  "auprc",
)
# Another source's Table 4: cheXlocalize's protocols only, with the all-images variants (the
# images with truth include images without the class's finding).
TABLE4_SOURCE_PROTOCOLS: tuple[str, ...] = (
  *TABLE4_CHEXLOCALIZE,
  "chexlocalize_miou_otsu_all",
  "chexlocalize_miou_otsu_cutoff",
)
# The WSRPN-style table (Mueller et al. 2024, Table 2): `scoring`'s detection family, pooled.
WSRPN_COLUMNS: tuple[tuple[str, str], ...] = (
  ("detection_rodeo_total", "RoDeO total"),
  ("detection_rodeo_localization", "RoDeO loc"),
  ("detection_rodeo_shape", "RoDeO shape"),
  ("detection_rodeo_classification", "RoDeO cls"),
  ("detection_ap@0.3", "AP@0.3"),
  ("detection_ap@0.5", "AP@0.5"),
  ("detection_loc_acc@0.3", "loc-acc@0.3"),
  ("detection_loc_acc@0.5", "loc-acc@0.5"),
)


def _is_lower_better(protocol: str) -> bool:
  return protocol.startswith("afp_")


def table4_rows(
  results_by_source: Mapping[str, Mapping],
  protocols: Sequence[str] = TABLE4_PROTOCOLS,
  classes: Sequence[str] | None = None,
  digits: int = 3,
) -> dict[str, Any]:
  """Table 4: for each class (and the mean over classes), one row per source x protocols.

  results_by_source: {source label (e.g. 'r0=5', 'gradcam', 'cam', 'constant', 'centre'):
  a `localization.score_all` result}. Cells are 'value (lo-hi)'; within a class and protocol
  the best source is bold (lowest for the afp_* protocols; ties all bold). The mean row
  averages the class values (no interval). Returns {'rows': [{'class', 'source', protocol:
  {'value', 'lo', 'hi', 'best'}}], 'markdown': str, 'csv': str}.
  """
  sources = list(results_by_source)
  present = {c for r in results_by_source.values() for p in protocols for c in r.get(p, {})}
  order = (
    list(classes)
    if classes is not None
    else ([c for c in CLASSES if c in present] + sorted(present - set(CLASSES)))
  )
  rows = []
  for cls in [*order, "mean"]:
    block = []
    for src in sources:
      res, row = results_by_source[src], {"class": cls, "source": src}
      for p in protocols:
        if cls == "mean":
          vals = [_num(res.get(p, {}).get(c, {}).get("value")) for c in order]
          vals = [v for v in vals if not math.isnan(v)]
          row[p] = {
            "value": float(np.mean(vals)) if vals else math.nan,
            "lo": math.nan,
            "hi": math.nan,
          }
        else:
          e = res.get(p, {}).get(cls, {})
          row[p] = {key: _num(e.get(key)) for key in ("value", "lo", "hi")}
      block.append(row)
    for p in protocols:
      vals = np.array([r[p]["value"] for r in block])
      ok = ~np.isnan(vals)
      # A source without the protocol (the constant map has no mIoU) is NaN: not a candidate.
      best = (vals[ok].min() if _is_lower_better(p) else vals[ok].max()) if ok.any() else math.nan
      for r, v in zip(block, vals, strict=True):
        r[p]["best"] = bool(ok.any() and v == best)
    rows.extend(block)
  return {
    "rows": fileio.json_safe(rows),
    "markdown": _markdown(rows, protocols, digits),
    "csv": _csv(rows, protocols),
  }


def wsrpn_table(results_by_source: Mapping[str, Mapping], digits: int = 3) -> tuple[str, str]:
  """The WSRPN-style table: one row per source, `WSRPN_COLUMNS` of its `scoring.score`
  result's '(all)' entries (AP and loc-acc: the class mean; RoDeO: pooled), 'value (lo-hi)';
  best per column in bold. Returns (markdown, csv)."""
  names = list(results_by_source)
  vals = {
    (src, p): {k: _num((results_by_source[src].get(p) or {}).get("(all)", {}).get(k))
               for k in ("value", "lo", "hi")}
    for src in names for p, _ in WSRPN_COLUMNS
  }  # fmt: skip
  best = {}
  for p, _ in WSRPN_COLUMNS:
    v = np.array([vals[src, p]["value"] for src in names])
    best[p] = np.nanmax(v) if (~np.isnan(v)).any() else math.nan
  md_rows, csv_rows = [], []
  for src in names:
    cells = [_cell({**vals[src, p], "best": vals[src, p]["value"] == best[p]}, digits)
             for p, _ in WSRPN_COLUMNS]  # fmt: skip
    md_rows.append([src, *cells])
    csv_rows.append([src, *(_csv_num(vals[src, p][k]) for p, _ in WSRPN_COLUMNS
                            for k in ("value", "lo", "hi"))])  # fmt: skip
  header = ["source", *(label for _, label in WSRPN_COLUMNS)]
  csv_header = ["source", *(f"{p}_{k}" for p, _ in WSRPN_COLUMNS for k in ("value", "lo", "hi"))]
  return tables.markdown(header, md_rows), tables.csv_text(csv_header, csv_rows)


def _num(v) -> float:
  return math.nan if v is None else float(v)


def _cell(e: Mapping, digits: int) -> str:
  v = e["value"]
  if math.isnan(v):
    return "-"
  text = f"{v:.{digits}f}"
  if e["best"]:
    text = f"**{text}**"
  if not (math.isnan(e["lo"]) or math.isnan(e["hi"])):
    text += f" ({e['lo']:.{digits}f}-{e['hi']:.{digits}f})"
  return text


def _markdown(rows, protocols, digits) -> str:
  body = [[r["class"], r["source"], *(_cell(r[p], digits) for p in protocols)] for r in rows]
  return tables.markdown(["Class", "Source", *protocols], body)


def _csv(rows, protocols) -> str:
  header = [
    "class",
    "source",
    *[f"{p}_{k}" for p in protocols for k in ("value", "lo", "hi", "best")],
  ]
  body = []
  for r in rows:
    cells = []
    for p in protocols:
      e = r[p]
      cells += ["" if math.isnan(e[k]) else f"{e[k]:.6g}" for k in ("value", "lo", "hi")]
      cells.append(int(e["best"]))
    body.append([r["class"], r["source"], *cells])
  return tables.csv_text(header, body)


# ----------------------------------------------------------------------------------------------
# Beyond the paper: spread over seeds, calibration


def mean_sd(values) -> tuple[float, float]:
  """(mean, sample sd with ddof 1) of the defined values; sd NaN for fewer than two."""
  v = np.array([x for x in values if _defined(x)], dtype=np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def spread_table(groups: Sequence[Mapping]) -> tuple[str, str]:
  """Run-to-run spread: per label, mean ± sd over its seeds and each seed's value.

  groups: [{'label', 'seeds': [{'seed', 'mean_auc', 'mean_dice'}, ...]}]; 'mean_dice' is
  the mean over the box classes of the run's per-class DICE (Table 3's A.V.G. DICE).
  CSV: one row per (label, seed) plus a 'mean' and an 'sd' row per label.
  """
  header = ["run", "seeds", "mean AUC (mean ± sd)", "mean AUC per seed"]
  header += ["mean DICE (mean ± sd)", "mean DICE per seed"]
  md_rows, csv_rows = [], []
  for g in groups:
    seeds = list(g["seeds"])
    row = [str(g["label"]), ", ".join(str(s["seed"]) for s in seeds)]
    for key in ("mean_auc", "mean_dice"):
      vals = [s.get(key) for s in seeds]
      m, sd = mean_sd(vals)
      row.append(_with_sd(_md_num(m, 3), m, sd))
      row.append(", ".join(_md_num(v if v is not None else math.nan, 3) for v in vals))
    md_rows.append(row)
    for s in seeds:
      csv_rows.append([g["label"], str(s["seed"]), _csv_num(s.get("mean_auc"))])
      csv_rows[-1].append(_csv_num(s.get("mean_dice")))
    for stat, idx in (("mean", 0), ("sd", 1)):
      auc = mean_sd([s.get("mean_auc") for s in seeds])[idx]
      dice = mean_sd([s.get("mean_dice") for s in seeds])[idx]
      csv_rows.append([g["label"], stat, _csv_num(auc), _csv_num(dice)])
  csv_header = ["run", "seed", "mean_auc", "mean_dice"]
  return tables.markdown(header, md_rows), tables.csv_text(csv_header, csv_rows)


def calibration_table(runs: Sequence[Mapping]) -> tuple[str, str]:
  """ECE (15 equal-mass bins) and Brier score per run, raw and (where given) recalibrated.

  runs: [{'label', 'calibration': `calibration.calibration_metrics` dict, 'calibration_fitted':
  the same after a fit (optional), 'method': name of the fit (optional)}]. Markdown: the
  overall (pooled) values; CSV: overall and per class ('class' empty for overall).
  """
  header = ["run", "ECE (raw)", "Brier (raw)", "ECE (fitted)", "Brier (fitted)", "fit"]
  md_rows, csv_rows = [], []
  for r in runs:
    raw, fitted = r["calibration"], r.get("calibration_fitted") or {}
    md_rows.append(
      [str(r["label"])]
      + [_md_num(_nan(raw.get(k)), 4) for k in ("ece_overall", "brier_overall")]
      + [_md_num(_nan(fitted.get(k)), 4) if fitted else "-" for k in ("ece_overall",)]
      + [_md_num(_nan(fitted.get(k)), 4) if fitted else "-" for k in ("brier_overall",)]
      + [str(r.get("method") or "-")]
    )
    classes = [""] + [c for c in CLASSES if c in raw.get("ece", {})]
    for cls in classes:

      def get(d, key, cls=cls):
        return _nan(d.get(f"{key}_overall") if not cls else d.get(key, {}).get(cls))

      csv_rows.append(
        [r["label"], cls]
        + [_csv_num(get(raw, k)) for k in ("ece", "brier")]
        + [_csv_num(get(fitted, k)) if fitted else "" for k in ("ece", "brier")]
        + [r.get("method") or ""]
      )
  csv_header = ["run", "class", "ece", "brier", "ece_fitted", "brier_fitted", "fit"]
  return tables.markdown(header, md_rows), tables.csv_text(csv_header, csv_rows)


def _nan(v) -> float:
  return math.nan if v is None else float(v)
