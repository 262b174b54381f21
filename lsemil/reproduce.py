"""`lsemil reproduce`: the paper's Tables 1-3 and Figures 1 and 3 from trained runs (Sec 4.1-4.4).

  lsemil reproduce --run r0=0:W0 --run r0=5:W5 --run r0=10:W10 --data-dir D --out R

From the best checkpoint of each run (any subset of runs, one alone too) this writes, in the
paper's layout with the paper's numbers as reference columns (`lsemil.report`):

- R/table1.md/.csv: positives per class in train / valid / test and boxes (Sec 4.1, Table 1),
  from the dataset index;
- R/table2.md/.csv: IoBB accuracy at T(IoBB) = 0.5 for the (class, tau) columns of Table 2
  (the paper's Pneumonia / Nodule / Infiltration taus by default, `--tau` to change), one row
  per run; R/table2_sweep.md/.csv: the same for all 8 box classes over the evaluation's tau sweep;
- R/table3.md/.csv: per-class AUC (with patient-bootstrap CI) of each run beside the paper's
  r0 = 0/5/10 columns and Wang et al.'s [3], the mean AUC row, and DICE of the 8 box classes
  beside the paper's and the uniform-map baseline (Sec 4.3, Table 3);
- R/figure3.png: for up to `--figure-images` test images with boxes (covering different
  classes, the same images for every run): image, ground-truth box, each run's saliency for
  the class with its DICE (Sec 4.4, Fig. 3);
- R/figure1.png: one image's saliency at each resolution level of the up path (Fig. 1);
- R/summary.json (everything above as data) and R/report.md (all tables, figure links).

Each run's evaluation is `lsemil.evaluate.evaluate_checkpoint`; an evaluation JSON already in
the run's workdir (W/evaluation_<split>.json with its saliency .npz) is reused when it is of the
same checkpoint step, split and dataset, and a fresh one is written there otherwise. The command
is `lsemil.commands.reproduce`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsemil import evaluate as ev
from lsemil import fileio, inference, report, tables
from lsemil.data import nih
from lsemil.errors import UserError

# --------------------------------------------------------------------------- runs


def load_or_evaluate(
  workdir,
  data_dir=None,
  *,
  split: str = "test",
  which: str = "best",
  n_boot: int = ev.DEFAULT_N_BOOT,
  force: bool = False,
  progress: bool = True,
) -> tuple[dict, dict | None, Any]:
  """(evaluation result, saliency dict or None, config) of a run's checkpoint.

  Reuses W/evaluation_<split>.json (+ its saliency .npz) when it matches the checkpoint's
  step, the split and the dataset; otherwise evaluates (`lsemil.evaluate.evaluate_checkpoint`,
  the one inference path) and writes all of `lsemil evaluate`'s outputs there, the per-image
  predictions too (a workdir that cannot be written is only warned about).
  """
  import jax

  loaded = inference.load(workdir, which)
  data_dir = ev.resolve_data_dir(loaded.config, data_dir)
  out = ev.default_output(ev.workdir_of(workdir), split)
  sal_path = ev.saliency_path_for(out)
  if not force and out.is_file() and sal_path.is_file():
    result = ev.load_evaluation(out)
    if ev.matches(result, step=loaded.step, split=split, data_dir=data_dir):
      ev.log(f"{workdir}: reusing {out} (step {loaded.step})")
      return result, ev.load_saliency(sal_path), loaded.config
  ev.log(f"{workdir}: evaluating step {loaded.step} on {split!r} of {data_dir}")
  options = ev.EvalOptions(n_boot=n_boot, progress=progress)
  run = ev.evaluate_checkpoint(loaded, data_dir, split, options)
  run.result.which = which
  if jax.process_index() != 0:
    return run.result.to_dict(), None, loaded.config
  try:
    ev.write_outputs(run, loaded.config, data_dir, out)
  except OSError as e:
    ev.log(f"warning: could not store the evaluation in {out} ({e})")
    return run.result.to_dict(), None, loaded.config
  return run.result.to_dict(), ev.load_saliency(sal_path), loaded.config


def _fill_iobb(result: dict, saliency: dict | None, index, taus_needed: Sequence[float]) -> None:
  """Adds IoBB accuracies at taus the stored evaluation lacks, from its saliency maps."""
  have = {float(t) for by_tau in result.get("iobb", {}).values() for t in by_tau}
  missing = sorted({float(t) for t in taus_needed} - have)
  if not missing or saliency is None:
    return
  loc = ev.localization_metrics(
    saliency["maps"], ev.box_cases(index, saliency["maps"]), index.box_space, taus=missing
  )
  for cls, by_tau in loc["iobb"].items():
    result.setdefault("iobb", {}).setdefault(cls, {}).update(by_tau)


# --------------------------------------------------------------------------- figures


def _figure3_cases(index, split, entries, n_figure, config, data_dir) -> list[dict]:
  picks = ev.figure_cases(index, split, n_figure)
  images: dict[int, np.ndarray] = {}
  for _, sal in entries:
    for row, _, img, _ in (sal or {}).get("figure", []):
      images.setdefault(row, img)
  need = [r for r, _ in picks if r not in images]
  if need:
    for r, img in zip(need, ev.stored_images(config, data_dir, split, need), strict=True):
      images[r] = img
  cases = []
  boxes_of = ev.box_cases(index, [r for r, _ in picks])
  for row, k in picks:
    boxes = dict(boxes_of.get(row, []))[k]
    sal_by_run = {}
    for res, sal in entries:
      m = (sal or {}).get("maps", {}).get(row)
      if m is not None:
        sal_by_run[res["label"]] = m[..., k]
    cases.append(
      {
        "image": images[row],
        "boxes": boxes,
        "source_size": float(index.box_space),
        "finding": nih.CLASSES[k],
        "saliency": sal_by_run,
      }
    )
  return cases


def _figure1(path: Path, entries) -> bool:
  """Figure 1 from the run labelled r0=5 (else the first with maps): levels coarse to fine."""
  order = sorted(entries, key=lambda e: e[0]["label"] != "r0=5")
  for res, sal in order:
    fig = (sal or {}).get("figure") or []
    if fig and fig[0][3]:
      _, k, img, levels = fig[0]
      named = [
        (f"{res['label']} {nih.CLASSES[k]} level {i}", lv[..., k]) for i, lv in enumerate(levels)
      ]
      report.figure1(path, img, named)
      return True
  return False


# --------------------------------------------------------------------------- tables


def _write(out_dir, name: str, md_csv: tuple[str, str], caption: str) -> str:
  md, csv_text = md_csv
  text = f"{caption}\n\n{md}"
  fileio.write_text(out_dir / f"{name}.md", text)
  fileio.write_text(out_dir / f"{name}.csv", csv_text)
  return text


def _save_figure(out_dir, name: str, draw) -> None:
  """Renders a figure with `draw(local_path)` into a temp folder, then copies it to out_dir
  (which may be gs://; matplotlib writes local files only)."""
  with tempfile.TemporaryDirectory() as tmp:
    local = Path(tmp) / name
    draw(local)
    fileio.write_bytes(out_dir / name, local.read_bytes())


def sweep_table(runs: Sequence[dict], taus: Sequence[float]) -> tuple[str, str]:
  """IoBB accuracy at T(IoBB) = 0.5 of every run and box class (rows) over taus (columns)."""
  header = ["run", "class", *(f"τ={t:g}" for t in taus)]
  md_rows, csv_rows = [], []
  for run in runs:
    table = {report.canonical_class(k): v for k, v in (run.get("iobb") or {}).items()}
    for cls in nih.BOX_CLASSES:
      by_tau = {float(k): v for k, v in table.get(cls, {}).items()}
      vals = [by_tau.get(float(t)) for t in taus]
      md_rows.append(
        [run["label"], report.display_class(cls)]
        + ["-" if v is None or math.isnan(v) else f"{v:.4f}" for v in vals]
      )
      csv_rows.append(
        [run["label"], cls] + ["" if v is None or math.isnan(v) else repr(v) for v in vals]
      )
  csv_header = ["run", "class", *(f"tau={t:g}" for t in taus)]
  return tables.markdown(header, md_rows), tables.csv_text(csv_header, csv_rows)


def reproduce_results(
  entries: Sequence[tuple[dict, dict | None]],
  index,
  out_dir,
  *,
  split: str = "test",
  classes_taus: Sequence[tuple[str, Sequence[float]]] = report.DEFAULT_CLASSES_TAUS,
  n_figure: int = ev.FIGURE_CASES,
  config=None,
  data_dir=None,
) -> dict:
  """Tables and figures from evaluated runs: [(result with 'label', saliency or None)].

  `index` is the dataset's `NihIndex` (Table 1, boxes); `config` / `data_dir` are needed only
  to read Figure 3 images the saliency files lack. Returns the summary dict (also written as
  R/summary.json).
  """
  from lsemil.data import stats as stats_lib

  out_dir = fileio.as_path(out_dir)
  if not entries:
    raise UserError("reproduce needs at least one run")
  labels = [r["label"] for r, _ in entries]
  if len(set(labels)) != len(labels):
    raise UserError(f"run labels must differ, got {labels}")
  needed = [t for _, taus in classes_taus for t in taus]
  for res, sal in entries:
    _fill_iobb(res, sal, index, needed)
  runs = [res for res, _ in entries]
  stats = stats_lib.table1(index)
  texts = {}
  texts["table1"] = _write(
    out_dir,
    "table1",
    report.table1(stats),
    f"**Table 1.** Positive images per class in each split and boxes per class "
    f"({index.kind} data at {index.root}); the paper's numbers beside ours.",
  )
  texts["table2"] = _write(
    out_dir,
    "table2",
    report.table2(runs, classes_taus),
    "**Table 2.** Localization accuracy at T(IoBB) = 0.5 for binarization thresholds τ.",
  )
  sweep_taus = sorted({float(t) for r in runs for t in r.get("taus", [])}) or list(ev.DEFAULT_TAUS)
  texts["table2_sweep"] = _write(
    out_dir,
    "table2_sweep",
    sweep_table(runs, sweep_taus),
    "**Table 2 (all box classes).** IoBB accuracy at T(IoBB) = 0.5 over the τ sweep; one row "
    "per run and box class ('-': no test box of the class).",
  )
  texts["table3"] = _write(
    out_dir,
    "table3",
    report.table3(runs),
    "**Table 3.** AUC of the 14 classes (95% patient-bootstrap CI) and DICE of the 8 box "
    "classes; bold = best of our runs per row.",
  )
  figures = []
  cases = _figure3_cases(index, split, entries, n_figure, config, data_dir) if n_figure else []
  if cases:
    _save_figure(out_dir, "figure3.png", lambda p: report.figure3(p, cases, labels))
    figures.append("figure3.png")
  if any((sal or {}).get("figure") for _, sal in entries):
    _save_figure(out_dir, "figure1.png", lambda p: _figure1(p, entries))
    figures.append("figure1.png")
  md = ["# Reproduction of Yao et al. 2018 (Tables 1-3, Figures 1 and 3)", ""]
  md += [f"Runs: {', '.join(labels)}; split {split!r}; data {index.root}.", ""]
  for name in ("table1", "table2", "table3", "table2_sweep"):
    md += [texts[name], ""]
  md += [f"![{f}]({f})" for f in figures]
  fileio.write_text(out_dir / "report.md", "\n".join(md) + "\n")
  summary = {
    "split": split,
    "data_dir": str(index.root),
    "labels": labels,
    "runs": runs,
    "table1": stats,
    "classes_taus": [[c, list(t)] for c, t in classes_taus],
    "figure3_cases": [{"finding": c["finding"], "runs": sorted(c["saliency"])} for c in cases],
    "figures": figures,
    "tables": texts,
    "paper": {
      "auc": report.PAPER_AUC,
      "mean_auc": report.PAPER_MEAN_AUC,
      "dice": report.PAPER_DICE,
      "iobb": {
        r: {c: {ev.tau_key(t): v for t, v in d.items()} for c, d in by.items()}
        for r, by in report.PAPER_IOBB.items()
      },
      "iobb_wang": report.PAPER_IOBB_WANG,
    },
  }
  fileio.write_json(out_dir / "summary.json", summary)
  return summary


def reproduce_runs(
  runs: Sequence[tuple[str, float | None, Any]],
  data_dir,
  out_dir,
  *,
  split: str = "test",
  which: str = "best",
  classes_taus: Sequence[tuple[str, Sequence[float]]] = report.DEFAULT_CLASSES_TAUS,
  n_figure: int = ev.FIGURE_CASES,
  n_boot: int = ev.DEFAULT_N_BOOT,
  force: bool = False,
  progress: bool = True,
) -> dict:
  """The Python API of `lsemil reproduce`: runs = [(label, r0 or None, workdir)].

  data_dir None uses the first run's `config.data.data_dir`. Returns the summary dict.
  """
  entries = []
  first_config = None
  for label, r0, workdir in runs:
    result, saliency, config = load_or_evaluate(
      workdir, data_dir, split=split, which=which, n_boot=n_boot, force=force, progress=progress
    )
    if first_config is None:
      first_config = config
      data_dir = ev.resolve_data_dir(config, data_dir)
    result = dict(result, label=str(label), workdir=str(workdir))
    if r0 is not None:
      result["r0"] = float(r0)
    entries.append((result, saliency))
  index = ev.open_index(first_config, data_dir)
  import jax

  if jax.process_index() != 0:  # only process 0 writes
    return {"labels": [r["label"] for r, _ in entries], "runs": [r for r, _ in entries]}
  return reproduce_results(
    entries,
    index,
    out_dir,
    split=split,
    classes_taus=classes_taus,
    n_figure=n_figure,
    config=first_config,
    data_dir=data_dir,
  )
