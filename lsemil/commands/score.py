"""`lsemil score`: cheXlocalize's localization protocols, as its official code computes them, for
any model's saliency maps.

  lsemil score --maps MAPS.npz --boxes BOXES.csv [--out DIR] [--per-image] [--n-boot 1000]
  lsemil score --maps MAPS.npz --masks GT.json ...   (cheXlocalize's {image: {class: COCO RLE}})

MAPS.npz: image_ids (N), classes (C), maps (N, C, h, w), optional probs (N, C), image_sizes
(N, 2) as height, width and patient_ids (N); BOXES.csv: image_id,class,x,y,w,h in the original
image's pixels (`lsemil.workflows.scoring`). Writes DIR/scores.csv, DIR/scores.json,
DIR/scores.md and with --per-image DIR/per_image.csv, and prints the class-mean of each protocol.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lsemil.commands import arguments
from lsemil.core import tables
from lsemil.metrics import chexlocalize
from lsemil.workflows import scoring


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil score",
    description="cheXlocalize's mIoU (Otsu, tuned threshold, all images, probability cutoff) "
    "and hit rate of saliency maps against boxes, step by step as its official code, with "
    "its image-bootstrap mean and 95 percent interval.",
  )
  p.add_argument(
    "--maps",
    required=True,
    help=".npz (or a folder of them, e.g. one per image): image_ids (N), classes (C), maps "
    "(N, C, h, w); optional probs (N, C), image_sizes (N, 2) height, width, patient_ids (N)",
  )
  truth = p.add_mutually_exclusive_group(required=True)
  truth.add_argument("--boxes", help="CSV image_id,class,x,y,w,h (image pixels)")
  truth.add_argument("--masks", help="cheXlocalize ground truth: JSON {image: {class: COCO RLE}}")
  p.add_argument("--out", default=".", help="output folder (default: the current one)")
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0, as eval.py)")
  p.add_argument(
    "--n-boot",
    type=arguments.nonnegative_int,
    default=chexlocalize.N_REPLICATES,
    help=f"bootstrap replicates (default {chexlocalize.N_REPLICATES}, as eval.py; 0 = none)",
  )
  p.add_argument("--per-image", action="store_true", help="also write per_image.csv")
  return p


def main(argv: list[str]) -> int:
  """`lsemil score`: see the module docstring."""
  args = build_parser().parse_args(argv)
  maps = scoring.read_maps(args.maps)
  if args.masks:
    result = scoring.score(maps, None, args.n_boot, args.seed, scoring.read_masks(args.masks, maps))
  else:
    result = scoring.score(maps, scoring.read_boxes(args.boxes, maps), args.n_boot, args.seed)
  for path in scoring.write_outputs(result, args.out, args.per_image):
    print(f"wrote {path}", file=sys.stderr)
  rows = []
  for name, by_cls in result.items():
    if name.startswith("chexlocalize_"):
      vals = [e["value"] for e in by_cls.values() if not np.isnan(e["value"])]
      rows.append([name, f"{np.mean(vals):.4f}" if vals else "-", str(len(vals))])
  print(tables.markdown(["protocol", "mean over classes", "classes"], rows))
  return 0
