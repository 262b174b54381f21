"""`lsemil synth`: write a synthetic dataset in the layout of a source (NIH ChestX-ray14 by
default)."""

from __future__ import annotations

import argparse

from lsemil.commands import progress
from lsemil.core import fileio
from lsemil.data import layouts, phantoms


def main(argv: list[str]) -> int:
  """`lsemil synth`: write a synthetic dataset in the layout of a source."""
  parser = argparse.ArgumentParser(
    prog="lsemil synth",
    description="""
    Write deterministic phantom chest radiographs with planted findings of the 14 NIH classes, in
    the exact NIH ChestX-ray14 layout (images/, Data_Entry_2017_v2020.csv, BBox_List_2017.csv,
    train_val_list.txt, test_list.txt). Re-running completes an interrupted run. With --layout,
    the same phantoms in the official layout of another source (CheXpert, the generic CSV, RSNA
    Pneumonia, SIIM-ACR; small sets for tests, written in one go into an empty folder).""",
  )
  parser.add_argument("--out", required=True, help="dataset folder to write")
  parser.add_argument(
    "--layout", choices=layouts.LAYOUTS, default="nih", help="the source's layout to write (nih)"
  )
  parser.add_argument(
    "--patients",
    type=int,
    default=600,
    help="number of patients, 1-4 images each (600, about 1500 images)",
  )
  parser.add_argument(
    "--size", type=int, choices=layouts.SIZES, default=512,
    help="image side (512; 128 and 256 for the other layouts only)",
  )
  parser.add_argument("--seed", type=int, default=0, help="dataset seed (0)")
  parser.add_argument(
    "--workers", type=int, default=None, help="rendering processes (default: up to 2)"
  )
  args = parser.parse_args(argv)
  if args.patients < 1:
    parser.error("--patients must be >= 1")
  if args.layout != "nih":
    layouts.write(args.layout, fileio.resolve(args.out), patients=args.patients,
                  size=args.size, seed=args.seed)
    print(fileio.resolve(args.out))
    return 0
  if args.size not in phantoms.SIZES:
    parser.error(f"argument --size: the nih layout takes {' or '.join(map(str, phantoms.SIZES))}")
  with progress.bars() as bar:
    out = phantoms.synthesize(
      fileio.resolve(args.out),
      patients=args.patients,
      size=args.size,
      seed=args.seed,
      workers=args.workers,
      progress=bar,
    )
  print(out)
  return 0
