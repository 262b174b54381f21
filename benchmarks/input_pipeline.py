"""Benchmark: training input pipeline throughput vs the raw PNG decode limit (Sec 4.2 inputs).

  python benchmarks/input_pipeline.py [--data-dir P] [--n 512] [--input-size 512]

Without --data-dir it writes a synthetic 512x512 dataset (lsemil.data.phantoms) to a temporary
folder. For 0, 1 and 2 grain worker processes it prints images/s of `make_train_iter`
(shuffle, decode, one-warp augmentation, batching) beside a plain decode loop over the same
train files with the same resources (0 workers: a thread pool in-process, like grain's read
threads; k workers: k processes), and their ratio: the best of --repeat interleaved runs
each, as other jobs may share the cores. Target: ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import ml_collections
import numpy as np

from lsemil.core import configuration
from lsemil.data import pipeline


def _decode(path: str) -> int:
  img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  return int(img.shape[0])


def _decode_many(paths: list[str]) -> int:
  return sum(_decode(p) > 0 for p in paths)


def raw_decode_rate(paths: list[str], n: int, workers: int) -> float:
  files = list(itertools.islice(itertools.cycle(paths), n))
  if workers == 0:
    threads = os.cpu_count() or 1
    with cf.ThreadPoolExecutor(threads) as ex:
      list(ex.map(_decode, files[: threads * 2]))  # warm up
      start = time.perf_counter()
      list(ex.map(_decode, files, chunksize=8))
  else:
    chunks = [files[i::workers] for i in range(workers)]
    with cf.ProcessPoolExecutor(workers) as ex:
      list(ex.map(_decode_many, [c[:2] for c in chunks]))  # start the processes
      start = time.perf_counter()
      list(ex.map(_decode_many, chunks))
  return n / (time.perf_counter() - start)


def make_config(input_size: int, batch: int, workers: int) -> ml_collections.ConfigDict:
  """The paper config (configs/paper.py states every default) at this size, batch and workers."""
  c = configuration.load_config("paper")
  c.model.input_size = input_size
  c.train.batch_size = c.train.eval_batch_size = batch
  c.data.worker_count = workers
  c.data.prefetch_buffer_size = 4
  return c


def pipeline_rate(data_dir: Path, n: int, workers: int, input_size: int, batch: int) -> float:
  it = pipeline.make_train_iter(make_config(input_size, batch, workers), data_dir)
  try:
    for _ in range(2):  # warm up: worker start-up, first reads
      next(it)
    steps = max(1, n // batch)
    start = time.perf_counter()
    for _ in range(steps):
      next(it)
    return steps * batch / (time.perf_counter() - start)
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data-dir", type=Path, default=None, help="prepared/synthetic folder")
  p.add_argument("--n", type=int, default=512, help="images timed per measurement")
  p.add_argument("--input-size", type=int, default=512, help="model input side")
  p.add_argument("--batch", type=int, default=16, help="batch size")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument(
    "--repeat", type=int, default=3, help="best of this many interleaved runs (shared CPUs)"
  )
  args = p.parse_args(argv)

  tmp = None
  data_dir = args.data_dir
  if data_dir is None:
    from lsemil.data.phantoms import synthesize

    tmp = tempfile.TemporaryDirectory(prefix="lsemil_bench_")
    patients = max(40, args.n // 2)
    print(f"writing a synthetic 512x512 dataset ({patients} patients) ...", file=sys.stderr)
    data_dir = synthesize(Path(tmp.name) / "nih", patients=patients, size=512, seed=0)
  try:
    source = pipeline.open_source(data_dir, "train")
    if source.format != "png":
      print("note: raw decode limit is measured on PNG folders only", file=sys.stderr)
      return 2
    paths = source.paths
    side = source[0]["image"].shape[0]
    print(
      f"{len(paths)} train images, {side}x{side} PNG -> {args.input_size}x{args.input_size}, "
      f"batch {args.batch}, {os.cpu_count()} cores, n={args.n}"
    )
    print(f"{'workers':>7} | {'pipeline img/s':>14} | {'raw decode img/s':>16} | {'ratio':>5}")
    print(f"{'-' * 7}-+-{'-' * 14}-+-{'-' * 16}-+-{'-' * 5}")
    for w in args.workers:
      raw = got = 0.0
      for _ in range(args.repeat):
        raw = max(raw, raw_decode_rate(paths, args.n, w))
        got = max(got, pipeline_rate(data_dir, args.n, w, args.input_size, args.batch))
      print(f"{w:>7} | {got:>14.0f} | {raw:>16.0f} | {got / raw:>5.2f}", flush=True)
  finally:
    if tmp is not None:
      tmp.cleanup()
  return 0


if __name__ == "__main__":
  np.seterr(all="ignore")
  sys.exit(main())
