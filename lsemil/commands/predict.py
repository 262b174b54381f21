"""`lsemil predict`: class probabilities and saliency overlays for image files (Sec 3.6, 4.4).

  lsemil predict --checkpoint C IMG [IMG ...] [--out DIR] [--threshold 0.5]

C is a training workdir (its best checkpoint), its checkpoints/ folder or one step folder,
local or gs://. See `lsemil.predict` for what is computed and written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lsemil import fileio, inference
from lsemil import predict as predict_lib
from lsemil.commands import args as args_lib
from lsemil.errors import OutputError


def _probability(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil predict",
    description="Per-class probabilities and saliency overlays (Yao et al. 2018, Sec 3.6) for "
    "PNG / JPEG / DICOM chest X-rays. Prints a table; writes DIR/predictions.csv and "
    "DIR/<image>_<class>.png for each class at or above --threshold. Exit status 1 if any file "
    "could not be read (the others still complete).",
  )
  p.add_argument(
    "--checkpoint",
    required=True,
    help="a training workdir, its checkpoints/ folder or a step folder (local or gs://)",
  )
  p.add_argument("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, DICOM)")
  p.add_argument(
    "--out",
    default="predictions",
    help="output folder for predictions.csv and overlays (default ./predictions)",
  )
  p.add_argument(
    "--threshold",
    type=_probability,
    default=0.5,
    help="probability at or above which a class gets an overlay (default 0.5)",
  )
  p.add_argument(
    "--which",
    choices=("best", "latest"),
    default="best",
    help="checkpoint of a workdir (default best validation mean AUC)",
  )
  p.add_argument(
    "--batch-size", type=args_lib.positive_int, default=16, help="images per forward (16)"
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  if fileio.is_remote(args.out):
    raise OutputError(f"--out {args.out}: predict writes overlays to a local folder")
  loaded = inference.load(args.checkpoint, args.which)
  print(f"checkpoint {loaded.checkpoint} (step {loaded.step})", file=sys.stderr)
  out = fileio.resolve(args.out)
  rows, failures = predict_lib.predict_files(
    loaded,
    args.images,
    out,
    threshold=args.threshold,
    batch_size=args.batch_size,
    progress=not args.no_progress,
  )
  print(predict_lib.format_table(rows, args.threshold))
  n_over = sum(len(r["overlays"]) for r in rows)
  print(f"wrote {Path(out) / 'predictions.csv'} and {n_over} overlays", file=sys.stderr)
  if failures:
    print(
      f"lsemil predict: {len(failures)} of {len(args.images)} files failed: "
      + ", ".join(p for p, _ in failures),
      file=sys.stderr,
    )
    return 1
  return 0
