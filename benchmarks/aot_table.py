"""Benchmark: README's "Before you rent a TPU" table, from `lsemil aot` on several topologies.

  python benchmarks/aot_table.py [--config paper] [--dtype bfloat16] [--per-chip-batch 32]
      [--topologies v4:2x2x1,v5e:2x2,v5p:2x2x1,v6e:2x2] [--set model.FIELD=VALUE ...]
      [--max-batch --batch-step 8 --batch-start 272,592,1840,552] [--out DIR]
  python benchmarks/aot_table.py --from DIR      # the table of JSON reports already written

Runs `lsemil aot ... --json DIR/<topology>.json` once per topology, one at a time (a paper
compile takes minutes and most of the host's memory bandwidth; needs the tpu extra), then
prints one Markdown row per report: the model's byte levers (dense blocks, up path, remat),
HBM of the train step per chip against capacity, XLA's flops and bytes per step, the roofline
bound and the estimated images/s per chip and slice. `--batch-start` gives each topology's
search a first guess (in the order of --topologies), e.g. from HBM's linear growth with the
batch, so that a right guess costs two compiles.
These are compile-time estimates against published peaks, not measurements on a TPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from lsemil.core import tables

HEADER = [
  "topology", "chips", "per chip", "dtype", "dense / up / remat", "compile s", "train HBM / chip",
  "eval HBM / chip", "capacity", "fits", "GFLOP / image", "GB / step", "bound",
  "est. img/s per chip", "est. img/s per slice", "est. min / NIH epoch", "max per-chip batch",
]  # fmt: skip


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def row(r: dict) -> list[str]:
  t, line = r["train"], r["train"]["roofline"]
  search = r.get("search", {})
  tried = ", ".join(f"{b}: {'yes' if ok else 'no'}" for b, ok in search.get("tried", {}).items())
  return [
    r["topology"],
    str(r["devices"]),
    str(r["per_chip_batch"]),
    r["dtype"],
    f"{r.get('dense_impl', '-')} / {r.get('up_impl', '-')} / {r.get('remat', '-')}",
    f"{t['compile_s']:.0f}",
    _gib(t["hbm"]["total"]),
    _gib(r["eval"]["hbm"]["total"]) if "eval" in r else "-",
    _gib(r["hbm_capacity"]),
    "yes" if r["fits"] else "no",
    f"{t['flops_per_image'] / 1e9:.1f}",
    f"{t['bytes'] / 1e9:.1f}",
    f"{line['bound']} ({line['ratio']:.1f}x)",
    f"{t['images_per_s_chip']:,.0f}",
    f"{t['images_per_s_slice']:,.0f}",
    f"{t['hours_per_epoch'] * 60:.2f}",
    f"{search['max_per_chip_batch']} (tried {tried})" if search else "-",
  ]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="paper")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--per-chip-batch", default="32")
  parser.add_argument("--topologies", default="v4:2x2x1,v5e:2x2,v5p:2x2x1,v6e:2x2")
  parser.add_argument("--max-batch", action="store_true")
  parser.add_argument("--batch-step", default="32")
  parser.add_argument("--batch-start", help="first guesses of --max-batch, one per topology")
  parser.add_argument("--set", action="append", default=[], help="passed to lsemil aot")
  parser.add_argument("--out", help="folder for the JSON reports (default: a temporary one)")
  parser.add_argument("--from", dest="source", help="only print the table of DIR/*.json")
  args = parser.parse_args()
  folder = Path(args.source or args.out or tempfile.mkdtemp(prefix="lsemil-aot-"))
  if not args.source:
    folder.mkdir(parents=True, exist_ok=True)
    topologies = args.topologies.split(",")
    starts = args.batch_start.split(",") if args.batch_start else [None] * len(topologies)
    for topology, start in zip(topologies, starts, strict=True):
      batch = ["--max-batch", "--batch-step", args.batch_step] if args.max_batch else [
        "--per-chip-batch", args.per_chip_batch]  # fmt: skip
      batch += ["--batch-start", start] if args.max_batch and start else []
      batch += [x for item in args.set for x in ("--set", item)]
      argv = [sys.executable, "-m", "lsemil.commands.cli", "aot", "--config", args.config,
              "--dtype", args.dtype, "--topology", topology, *batch,
              "--json", str(folder / f"{topology.replace(':', '_')}.json")]  # fmt: skip
      print("+", " ".join(argv[2:]), file=sys.stderr, flush=True)
      subprocess.run(argv, check=False)  # a config that does not fit exits 1: still a row
  reports = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
  reports = [r for r in reports if "train" in r]  # a search that found nothing has no step
  print(tables.markdown(HEADER, [row(r) for r in reports]), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
