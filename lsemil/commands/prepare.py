"""`lsemil prepare`: resize a dataset folder of any source to 512x512 PNGs (or NIH to TFDS),
as the paper's Sec 4.2 does."""

from __future__ import annotations

import argparse
import sys

from lsemil.commands import arguments, progress
from lsemil.core import fileio
from lsemil.data import nih, preparation


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil prepare",
    description=(
      "Resize a dataset folder of any source (PNG, JPEG, or DICOM windowed as "
      "lsemil.data.dicom reads it) to size x size 8-bit grayscale (as the paper's "
      "skimage.transform.resize, Sec 4.2) into a PNG folder, or an NIH folder into a TFDS "
      "array_record dataset. An NIH output is itself an NIH-layout folder (metadata copied, "
      "boxes rescaled); any other source's output records its source, class names, label "
      "matrix (blank = unknown) and split in index.csv and lsemil_dataset.json, boxes and "
      "masks rescaled. Resumable: rerun the same command after an interruption."
    ),
  )
  p.add_argument("--data-dir", "--nih-dir", dest="data_dir", required=True,
                 help="the dataset folder (for nih: images + CSVs)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--format", default="png", choices=("png", "tfds"),
                 help="default: png (tfds: nih only)")
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
    help=f"the patient-wise validation share (default {nih.VALID_FRACTION}; "
    "config.data.val_fraction): tfds splits, and other sources' splits",
  )
  p.add_argument("--split-seed", type=int, default=0, help="the seed of the patient-wise "
                 "splits (default 0; config.data.split_seed): tfds, other sources")
  arguments.add_source_options(p)
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  out = fileio.resolve(args.out)
  with progress.bars() as bar:
    summary = preparation.prepare(
      fileio.resolve(args.data_dir), out, fmt=args.format, size=args.size, on_bad=args.on_bad,
      workers=args.workers, val_fraction=args.val_fraction, split_seed=args.split_seed,
      progress=bar, source=args.source, policies=arguments.source_options(args),
    )  # fmt: skip
  for line in summary.lines(args.on_bad):
    print(line, file=sys.stderr)
  print(f"wrote {out}", file=sys.stderr)
  return 0
