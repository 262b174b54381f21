"""`lsemil demo`: the whole method on the embedded synthetic dataset, on a CPU.

The work is `lsemil.workflows.demonstration`.
"""

from __future__ import annotations

import argparse

from lsemil.commands import arguments, progress
from lsemil.core import fileio
from lsemil.workflows import demonstration


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="lsemil demo",
    description="""
    Synthesize a NIH-layout dataset, prepare it, train r0 = 0, 5, 10 with configs/demo.py and the
    Grad-CAM baseline (configs/baseline_gap.py:size=demo), evaluate and reproduce the paper's
    tables and figures, Table 4 and an HTML report, on a CPU (about 14 minutes on 2 cores; on a CPU
    the runs train side by side, one core each, logging to WORKDIR/train.log).""",
  )
  parser.add_argument("--out", default="lsemil_demo", help="output folder (default ./lsemil_demo)")
  parser.add_argument(
    "--quick", action="store_true", help="one r0 (5) on a smaller dataset: about 4 minutes"
  )
  parser.add_argument("--r0", default=None, help="comma-separated r0 values (default 0,5,10)")
  parser.add_argument("--patients", type=int, default=None, help="synthetic patients")
  parser.add_argument(
    "--epochs", type=arguments.positive_int, default=None, help="override train.num_epochs (10)"
  )
  parser.add_argument("--workers", type=int, default=None, help="processes for synth/prepare")
  parser.add_argument(
    "--seeds",
    type=arguments.positive_int,
    default=1,
    help="runs per r0 with seeds 0..K-1: Table 3 shows mean ± sd, spread.md every seed "
    "(default 1; each seed adds the training time of every r0)",
  )
  parser.add_argument(
    "--figure1",
    action="store_true",
    help="also train r0 = 5 at N = 8, 16, 64 (N = 32 is the r0 = 5 run) and draw the paper's "
    "Figure 1 (about 3 more runs' time; not part of the default demo)",
  )
  args = parser.parse_args(argv)
  r0s = [float(x) for x in args.r0.split(",")] if args.r0 else None
  with progress.bars() as bar:
    demo = demonstration.run_demo(
      fileio.resolve(args.out), quick=args.quick, r0s=r0s, patients=args.patients,
      epochs=args.epochs, workers=args.workers, seeds=args.seeds, figure1=args.figure1,
      progress=bar,
    )  # fmt: skip
  print(demonstration.format_summary(demo))
  return 0
