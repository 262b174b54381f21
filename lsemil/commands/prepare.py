"""`lsemil prepare`: resize an NIH folder to 512x512 PNGs or a TFDS dataset (Sec 4.2)."""

from __future__ import annotations

import argparse
import sys

from lsemil.commands import progress
from lsemil.core import fileio
from lsemil.data import nih, preparation


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil prepare",
    description=(
      "Resize an NIH ChestX-ray14 folder to size x size 8-bit grayscale (as the paper's "
      "skimage.transform.resize, Sec 4.2) into a PNG folder or a TFDS array_record dataset. "
      "The output is itself an NIH-layout folder (metadata copied, boxes rescaled). "
      "Resumable: rerun the same command after an interruption."
    ),
  )
  p.add_argument("--nih-dir", required=True, help="NIH folder (images + CSVs)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--format", default="png", choices=("png", "tfds"), help="default: png")
  p.add_argument(
    "--size", type=int, default=preparation.DEFAULT_SIZE, help="output side (default 512)"
  )
  p.add_argument(
    "--on-bad",
    default="error",
    choices=("error", "skip"),
    help="missing/corrupt image: stop with an error (default) or skip it, listing it in "
    f"{preparation.BAD_FILES_NAME} and dropping its rows from the copied metadata",
  )
  p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
  p.add_argument(
    "--val-fraction",
    type=float,
    default=nih.VALID_FRACTION,
    help=f"tfds splits (default {nih.VALID_FRACTION})",
  )
  p.add_argument("--split-seed", type=int, default=0, help="tfds splits (default 0)")
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  out = fileio.resolve(args.out)
  with progress.bars() as bar:
    summary = preparation.prepare(
      fileio.resolve(args.nih_dir), out, fmt=args.format, size=args.size, on_bad=args.on_bad,
      workers=args.workers, val_fraction=args.val_fraction, split_seed=args.split_seed,
      progress=bar,
    )  # fmt: skip
  for line in summary.lines(args.on_bad):
    print(line, file=sys.stderr)
  print(f"wrote {out}", file=sys.stderr)
  return 0
