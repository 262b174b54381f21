"""`lsemil stats`: print Table 1 (split and box statistics) of a dataset folder."""

from __future__ import annotations

import argparse
import sys

from lsemil.commands import arguments
from lsemil.core import fileio
from lsemil.data import nih, sources, statistics


def main(argv: list[str]) -> int:
  """`lsemil stats`: print Table 1 of a dataset folder of any source."""
  parser = argparse.ArgumentParser(
    prog="lsemil stats",
    description="Print Table 1 of the paper (positives per class and split, boxes per class) "
    "for an NIH ChestX-ray14 folder or a synthetic one in its layout; with --source, the "
    "same counts (and unknown labels) for a folder of another source. Reads the metadata "
    "only: images without a file are counted and named in a warning.",
  )
  parser.add_argument(
    "--data-dir",
    "--nih-dir",
    dest="data_dir",
    required=True,
    help="the dataset folder; for nih: Data_Entry_2017*.csv[.gz], BBox_List_2017.csv"
    "[.gz], train_val_list.txt[.gz] and test_list.txt[.gz] (images optional)",
  )
  parser.add_argument(
    "--format", choices=statistics.FORMATS, default="md", help="output format (md)"
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the validation draw (0)")
  arguments.add_source_options(parser)
  args = parser.parse_args(argv)
  data_dir = fileio.resolve(args.data_dir)
  if args.source == "nih":
    from lsemil.reporting import paper_tables  # scipy: a second of imports the others skip

    table = paper_tables.format_table1(nih.load_index(data_dir, seed=args.seed), args.format)
  else:
    source_index = sources.load(
      args.source, data_dir, seed=args.seed, **arguments.source_options(args)
    )
    table = statistics.format_source_table(source_index, args.format)
  sys.stdout.write(table)
  return 0
