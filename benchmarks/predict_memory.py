"""Benchmark: `lsemil predict` peak memory and time against the number of input files.

  python benchmarks/predict_memory.py [--n 200,2000] [--size 512] [--keep DIR]

Writes N size-px grey PNGs (16 distinct noisy phantoms, the rest hard links to them: every
file is still read and decoded on its own, without N x 260 KB of disk), a smoke-config
checkpoint with zero weights (no training) and runs `lsemil predict --threshold 1` (no
overlays to draw) on them, one process per N. Prints files, the process's peak RSS (its own
rusage from wait4) and wall seconds. Streaming keeps the peak flat in N: only the per-file
rows (about 1 KB each) grow. `--n 200,2000,20000` adds the long run (a few minutes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def write_checkpoint(workdir: Path) -> None:
  """A smoke-config workdir whose one checkpoint (step 1) holds zero weights."""
  import grain
  import jax

  from lsemil.core import configuration
  from lsemil.models import registry
  from lsemil.runtime import checkpointing
  from lsemil.training import trainer

  config = configuration.load_config("smoke")
  model = registry.from_config(config.model, saved=True)
  abstract = trainer.abstract_state(model, trainer.create_optimizer(config), 0)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract).replace(step=np.int32(1))
  manager = checkpointing.create_manager(str(workdir), keep=1, async_save=False)
  it = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
  checkpointing.save(
    manager, 1, state, it, config=config, meta={}, metrics={checkpointing.BEST_METRIC: 0.5}
  )
  manager.wait_until_finished()
  manager.close()


def write_images(folder: Path, n: int, size: int) -> list[str]:
  """n PNG names in `folder`: 16 distinct phantoms, the rest hard links to them."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  names = []
  for i in range(n):
    name = f"{i:05d}.png"
    if i < 16:
      img = np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 4) * 200 + rng.normal(0, 8, xx.shape)
      cv2.imwrite(str(folder / name), np.clip(img, 0, 255).astype(np.uint8))
    elif not (folder / name).exists():
      os.link(folder / f"{i % 16:05d}.png", folder / name)
    names.append(name)
  return names


def run_predict(workdir: Path, folder: Path, names: list[str], out: Path) -> tuple[float, float]:
  """(peak RSS in MB, seconds) of one `lsemil predict` process on `names` (in `folder`)."""
  argv = [sys.executable, "-m", "lsemil.commands.cli", "predict", "--checkpoint", str(workdir)]
  argv += [*names, "--out", str(out), "--threshold", "1", "--no-progress"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with tempfile.TemporaryFile("w+") as err:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
      err.seek(0)
      raise SystemExit(f"lsemil predict on {len(names)} files failed:\n{err.read()[-3000:]}")
  rows = (out / "predictions.csv").read_text().count("\n") - 1
  assert rows == len(names), (rows, len(names))
  return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KB on Linux


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", default="200,2000", help="comma-separated file counts (200,2000)")
  p.add_argument("--size", type=int, default=512, help="image side in px (512)")
  p.add_argument("--keep", help="work folder to keep (default: a temporary one)")
  args = p.parse_args()
  counts = [int(x) for x in args.n.split(",")]
  with tempfile.TemporaryDirectory(prefix="predict-memory-") as tmp:
    root = Path(args.keep or tmp)
    workdir = root / "w"
    if not workdir.exists():
      write_checkpoint(workdir.resolve())
    names = write_images(root / "images", max(counts), args.size)
    print(f"{'files':>7}  {'peak RSS MB':>11}  {'seconds':>8}")
    for n in counts:
      rss, seconds = run_predict(workdir.resolve(), root / "images", names[:n], root / f"out{n}")
      print(f"{n:>7}  {rss:>11.0f}  {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
  main()
