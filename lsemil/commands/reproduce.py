"""`lsemil reproduce`: the paper's Tables 1-3 and Figures 1 and 3 from trained runs (Sec 4.1-4.4),
with significance, spread over seeds, calibration, Table 4 and an HTML report.

  lsemil reproduce --run r0=0:W0 --run r0=5:W5 --run r0=10:W10 --data-dir D --out R
  lsemil reproduce --run r0=5:W5a --run r0=5:W5b --baseline gradcam:WG \
      --figure1 N=8:W8 --figure1 N=16:W16 --figure1 N=32:W5a --figure1 N=64:W64 --out R
  lsemil reproduce --run r0=5:W5 --extra-truth rsna-pneumonia=DIR --out R   # Table 4 on RSNA too

See `lsemil.workflows.reproduction` for what is written.
"""

from __future__ import annotations

import argparse
import math
import re
import unicodedata

from lsemil.commands import arguments, progress
from lsemil.core import fileio
from lsemil.data import nih, sources
from lsemil.reporting import paper_tables
from lsemil.runtime import sharding
from lsemil.workflows import evaluation, reproduction

_R0_LABEL = re.compile(r"^r0=([-+0-9.eE]+)$")


def parse_run(spec: str) -> tuple[str, float | None, str]:
  """'r0=5:W' -> ('r0=5', 5.0, 'W'); 'name:W' -> ('name', None, 'W'); 'W' -> ('W', None, 'W')."""
  label, sep, path = spec.partition(":")
  if not sep or "/" in label or not path or path.startswith("//"):
    label, path = spec, spec  # a bare path (also gs://...) is its own label
  # The label is a Markdown table cell, a heading of index.html and a matplotlib title.
  bad = "".join(sorted({c for c in label if c == "|" or unicodedata.category(c)[0] == "C"}))
  if bad:
    raise argparse.ArgumentTypeError(
      f"--run {spec!r}: the label {label!r} holds {bad!r}; a label may hold any printable "
      "characters but '|' (no newline, tab or other control character)"
    )
  if path == spec:
    return spec, None, spec
  m = _R0_LABEL.match(label)
  r0 = float(m.group(1)) if m else None
  if r0 is not None and not math.isfinite(r0):
    raise argparse.ArgumentTypeError(f"--run {spec!r}: r0 must be a finite number")
  return label, r0, path


def parse_baseline(spec: str) -> tuple[str, str]:
  """'gradcam:W' -> ('gradcam', 'W'); the source is gradcam or cam."""
  source, sep, path = spec.partition(":")
  if not sep or not path or source not in reproduction.BASELINE_SOURCES:
    raise argparse.ArgumentTypeError(
      f"--baseline {spec!r}: expected SOURCE:WORKDIR with SOURCE one of "
      f"{reproduction.BASELINE_SOURCES}"
    )
  return source, path


def parse_figure1(spec: str) -> tuple[int, str]:
  """'N=8:W' -> (8, 'W'): the run trained at target saliency resolution N."""
  head, sep, path = spec.partition(":")
  key, eq, value = head.partition("=")
  if not (sep and eq and path and key.strip() == "N" and value.strip().isdigit()):
    raise argparse.ArgumentTypeError(f"--figure1 {spec!r}: expected N=<side>:WORKDIR")
  return int(value), path


def parse_tau(spec: str) -> tuple[str, tuple[float, ...]]:
  """'Nodule=0.4,0.8' -> ('Nodule', (0.4, 0.8))."""
  name, sep, values = spec.partition("=")
  if not sep:
    raise argparse.ArgumentTypeError(f"--tau {spec!r}: expected CLASS=T1,T2,...")
  cls = paper_tables.canonical_class(name)
  if cls not in paper_tables.TABLE2_CLASSES:
    raise argparse.ArgumentTypeError(
      f"--tau {spec!r}: {cls} has no boxes; box classes: {paper_tables.TABLE2_CLASSES}"
    )
  taus = tuple(arguments.unit_floats(values, f"--tau {spec!r}"))
  return cls, taus


def parse_truth(spec: str) -> tuple[str, str]:
  """'rsna-pneumonia=DIR' -> ('rsna-pneumonia', 'DIR'): a source's folder as its reader reads it."""
  source, sep, path = spec.partition("=")
  if not sep or not path or source not in sources.READERS or source == "nih":
    others = ", ".join(s for s in sources.READERS if s != "nih")
    raise argparse.ArgumentTypeError(
      f"--extra-truth {spec!r}: expected SOURCE=DIR with SOURCE one of {others}"
    )
  return source, path


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil reproduce",
    description="""
    Tables 1-3 and Figures 1 and 3 of Yao et al. 2018 from trained runs, in the paper's layout
    beside the paper's numbers, with significance tests, spread over seeds, calibration, Table 4
    (weak-localization protocols against baselines) and a self-contained index.html (Markdown +
    CSV, PNG, summary.json).""",
  )
  p.add_argument(
    "--run",
    action="append",
    required=True,
    metavar="LABEL:WORKDIR",
    help="a run, e.g. r0=5:W5 (repeatable; labels r0=0 / r0=5 / r0=10 line up with the "
    "paper's columns; runs sharing a label are seeds, reported as mean ± sd; a bare WORKDIR "
    "is labelled by its path; a GAP run (configs/baseline_gap.py) is a baseline)",
  )
  p.add_argument(
    "--baseline",
    action="append",
    default=[],
    metavar="SOURCE:WORKDIR",
    help="a GAP run's post-hoc maps for Table 4, SOURCE gradcam or cam (repeatable)",
  )
  p.add_argument(
    "--figure1",
    action="append",
    default=[],
    metavar="N=<side>:WORKDIR",
    help="a run trained at target saliency resolution N (configs/demo.py:N=8); two or more "
    "draw the paper's Figure 1 (repeatable)",
  )
  p.add_argument("--data-dir", help="dataset folder (default: data.data_dir of the first run)")
  p.add_argument(
    "--extra-truth",
    action="append",
    default=[],
    metavar="SOURCE=DIR",
    help="Table 4 (cheXlocalize's protocols) and for boxes the WSRPN-style table also against "
    "another source's boxes or masks, e.g. rsna-pneumonia=DIR (the folder as the source "
    "releases it); run classes are matched through the synonym table (repeatable)",
  )
  p.add_argument("--out", required=True, help="output folder R")
  p.add_argument("--split", choices=nih.SPLITS, default="test", help="default test")
  arguments.add_which(p, "checkpoint of each run (default best validation mean AUC)")
  p.add_argument(
    "--tau",
    action="append",
    metavar="CLASS=T1,T2",
    help="Table 2 columns (repeatable; default the paper's Pneumonia=0.1,0.4 "
    "Nodule=0.4,0.8 Infiltration=0.1,0.8)",
  )
  p.add_argument(
    "--figure-images",
    type=int,
    default=evaluation.FIGURE_CASES,
    help=f"rows of Figure 3 (default {evaluation.FIGURE_CASES}; 0 = no Figure 3)",
  )
  p.add_argument(
    "--n-boot",
    type=arguments.nonnegative_int,
    default=evaluation.DEFAULT_N_BOOT,
    help="bootstrap resamples for AUC CIs when a run must be evaluated (and Table 4's "
    "intervals of the constant map and centre prior when no run gives its settings)",
  )
  p.add_argument(
    "--calibrate",
    choices=("temperature", "platt"),
    help="fit a recalibration on the valid split in each evaluation; calibration.md and the "
    "reliability diagrams then show raw and fitted",
  )
  p.add_argument("--no-html", action="store_true", help="no index.html")
  p.add_argument(
    "--force", action="store_true", help="re-evaluate even when a matching evaluation JSON exists"
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def main(argv: list[str]) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  sharding.maybe_initialize_distributed()
  try:
    runs = [parse_run(s) for s in args.run]
    baselines = [parse_baseline(s) for s in args.baseline]
    figure1 = [parse_figure1(s) for s in args.figure1]
    extra_truth = [parse_truth(s) for s in args.extra_truth]
    classes_taus = (
      [parse_tau(s) for s in args.tau] if args.tau else paper_tables.DEFAULT_CLASSES_TAUS
    )
  except argparse.ArgumentTypeError as e:
    parser.error(str(e))
  runs = [(label, r0, fileio.resolve(path)) for label, r0, path in runs]
  baselines = [(source, fileio.resolve(path)) for source, path in baselines]
  figure1 = [(n, fileio.resolve(path)) for n, path in figure1]
  extra_truth = [(source, fileio.resolve(path)) for source, path in extra_truth]
  out = fileio.resolve(args.out)
  with progress.bars(not args.no_progress) as bar:
    summary = reproduction.reproduce_runs(
      runs,
      args.data_dir and fileio.resolve(args.data_dir),
      out,
      split=args.split,
      which=args.which,
      classes_taus=classes_taus,
      n_figure=args.figure_images,
      n_boot=args.n_boot,
      force=args.force,
      progress=bar,
      baselines=baselines,
      figure1=figure1,
      html=not args.no_html,
      calibrate=args.calibrate,
      extra_truth=extra_truth,
    )
  if "tables" in summary:  # process 0
    print(summary["tables"]["table3"])
    figures = ", ".join(summary["figures"]) or "no figures"
    print(f"wrote tables, {figures} and summary.json to {out}")
    if summary.get("index_html"):
      print(f"report: {summary['index_html']}")
  return 0
