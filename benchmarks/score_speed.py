"""Benchmark: `lsemil score` on an NIH-box-set-sized input, seconds per protocol family.

  python benchmarks/score_speed.py [--images 880] [--boxes 984] [--classes 8] [--image-size 512]
      [--map-size 64] [--n-boot 1000] [--profile FAMILY]

A synthetic map set the size of NIH's box set (880 images, 984 boxes over 8 classes): maps of
the paper model's saliency size (64 x 64, configs/paper.py) over images of its 512 px input,
a smooth background (8 x 8 noise upsampled) with 3% pixel noise and one bump per box;
probabilities mostly above 0.5 for an image's box classes and below for the others.
Times `lsemil.workflows.scoring.score` for each family of
`scoring.PROTOCOLS` with `--n-boot` replicates (1,000 by default, as cheXlocalize's eval.py)
and `write_outputs`, prints a Markdown table and whether the total is within 60 s (the issue's
budget, on 2 cores). `--profile FAMILY` prints cProfile's top functions of that family.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time

import cv2
import numpy as np

from lsemil.core import tables
from lsemil.data import nih
from lsemil.workflows import scoring

BUDGET_S = 60.0
CLASSES = nih.BOX_CLASSES  # NIH's 8 box classes


def synthetic(n: int, n_boxes: int, n_classes: int, image: int, side: int, seed: int = 0):
  """(MapSet, boxes, box order): every image has a box, the rest spread at random."""
  rng = np.random.default_rng(seed)
  owner = np.concatenate([np.arange(n), rng.integers(0, n, n_boxes - n)])
  ids = tuple(f"{i // 2:08d}_{i % 2:03d}.png" for i in range(n))  # two images per patient
  # smooth background (8 x 8 noise, bilinear to the map) with a little pixel noise: a CNN's map
  low = rng.random((n * n_classes, 8, 8), dtype=np.float32) * 0.3
  maps = np.stack([cv2.resize(m, (side, side), interpolation=cv2.INTER_LINEAR) for m in low])
  maps = maps.reshape(n, n_classes, side, side)
  maps += rng.random(maps.shape, dtype=np.float32) * 0.03
  probs = rng.beta(1.5, 6.0, (n, n_classes))
  yy, xx = np.mgrid[0:side, 0:side] * (image / side)
  boxes, order = {}, []
  for i in owner:
    k = int(rng.integers(n_classes))
    w, h = rng.uniform(0.05, 0.4, 2) * image
    x, y = rng.uniform(0, image - w), rng.uniform(0, image - h)
    boxes.setdefault((ids[i], CLASSES[k]), []).append((x, y, w, h))
    order.append(ids[i])
    bump = np.exp(-(((xx - x - w / 2) / w) ** 2 + ((yy - y - h / 2) / h) ** 2) * 2)
    maps[i, k] += bump.astype(np.float32)
    probs[i, k] = rng.beta(5.0, 2.0)
  ms = scoring.MapSet(ids, CLASSES[:n_classes], maps, probs, np.full((n, 2), image),
                      tuple(im[:8] for im in ids))  # fmt: skip
  return ms, boxes, order


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--images", type=int, default=880)
  p.add_argument("--boxes", type=int, default=984)
  p.add_argument("--classes", type=int, default=8)
  p.add_argument("--image-size", type=int, default=512)
  p.add_argument("--map-size", type=int, default=64)
  p.add_argument("--n-boot", type=int, default=1000)
  p.add_argument("--profile", choices=scoring.PROTOCOLS, help="cProfile one family")
  args = p.parse_args()
  ms, boxes, order = synthetic(
    args.images, args.boxes, args.classes, args.image_size, args.map_size
  )
  rows, total, results = [], 0.0, {}
  for family in scoring.PROTOCOLS:
    prof = cProfile.Profile() if args.profile == family else None
    t0 = time.perf_counter()
    if prof:
      prof.enable()
    results.update(scoring.score(ms, boxes, args.n_boot, 0, None, (family,), order))
    if prof:
      prof.disable()
    dt = time.perf_counter() - t0
    total += dt
    rows.append([family, f"{dt:.1f}"])
    if prof:
      pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
  with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    scoring.write_outputs(results, out, per_image=True)
    dt = time.perf_counter() - t0
  total += dt
  rows += [["write_outputs", f"{dt:.1f}"], ["total", f"{total:.1f}"]]
  print(f"{args.images} images, {args.boxes} boxes, {args.classes} classes, "
        f"{args.map_size} px maps of {args.image_size} px images, {args.n_boot} replicates, "
        f"{os.cpu_count()} CPUs visible")  # fmt: skip
  print(tables.markdown(["protocol family", "seconds"], rows))
  verdict = "within" if total <= BUDGET_S else "over"
  print(f"total {total:.1f} s: {verdict} the {BUDGET_S:.0f} s budget")


if __name__ == "__main__":
  main()
