"""`lsemil stats`: print Table 1 (split and box statistics) of an NIH-layout folder."""

from __future__ import annotations

import argparse
import sys

from lsemil.core import fileio
from lsemil.data import nih
from lsemil.reporting import paper_tables


def main(argv: list[str]) -> int:
  """`lsemil stats`: print Table 1 of an NIH-layout folder."""
  parser = argparse.ArgumentParser(
    prog="lsemil stats",
    description="Print Table 1 of the paper (positives per class and split, boxes per class) "
    "for an NIH ChestX-ray14 folder or a synthetic one in its layout.",
  )
  parser.add_argument(
    "--nih-dir",
    required=True,
    help="folder with Data_Entry_2017*.csv[.gz], BBox_List_2017.csv"
    "[.gz], train_val_list.txt[.gz] and test_list.txt[.gz] (images optional)",
  )
  parser.add_argument(
    "--format", choices=paper_tables.TABLE1_FORMATS, default="md", help="output format (md)"
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the validation draw (0)")
  args = parser.parse_args(argv)
  index = nih.load_index(fileio.resolve(args.nih_dir), seed=args.seed)
  sys.stdout.write(paper_tables.format_table1(index, args.format))
  return 0
