"""`lsemil score`: cheXlocalize's localization protocols, as its official code computes them, and
detection metrics (AP@0.3/0.5, WSRPN's loc-acc, RoDeO) for any model's saliency maps.

  lsemil score --maps MAPS.npz --boxes BOXES.csv [--out DIR] [--per-image] [--n-boot 1000]
  lsemil score --maps MAPS.npz --masks GT.json ...   (cheXlocalize's {image: {class: COCO RLE}})
  lsemil score --maps MAPS.npz --source nih --data-dir D ...   (a dataset folder's boxes / masks)
  ... --protocol chexlocalize,detection,wsrpn   (default chexlocalize,detection; or all)

MAPS.npz: image_ids (N), classes (C), maps (N, C, h, w), optional probs (N, C), image_sizes
(N, 2) as height, width and patient_ids (N); BOXES.csv: image_id,class,x,y,w,h in the original
image's pixels (`lsemil.workflows.scoring`). Writes DIR/scores.csv, DIR/scores.json,
DIR/scores.md, DIR/scores.html and with --per-image DIR/per_image.csv, and prints the class mean
(or pooled value) of each protocol.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lsemil.commands import arguments
from lsemil.core import tables
from lsemil.data import sources
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
  truth.add_argument("--source", choices=tuple(sources.READERS), help="a dataset folder's truth")
  p.add_argument("--data-dir", help="the --source folder")
  p.add_argument(
    "--protocol",
    default="chexlocalize,detection",
    type=_protocols,
    help="comma-separated families: chexlocalize, detection, wsrpn (WSRPN's test half), or all "
    "(default chexlocalize,detection; detection needs boxes)",
  )
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


def _protocols(text: str) -> tuple[str, ...]:
  names = [t.strip() for t in text.split(",") if t.strip()]
  if names == ["all"]:
    return scoring.PROTOCOLS
  bad = [t for t in names if t not in scoring.PROTOCOLS]
  if bad or not names:
    raise argparse.ArgumentTypeError(
      f"{text!r}: expected all or some of {', '.join(scoring.PROTOCOLS)}"
    )
  return tuple(names)


def main(argv: list[str]) -> int:
  """`lsemil score`: see the module docstring."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if bool(args.source) != bool(args.data_dir):
    parser.error("--source and --data-dir go together")
  maps = scoring.read_maps(args.maps)
  boxes = masks = None
  order: list = []
  if args.source:
    maps, boxes, masks, order = scoring.truth_from_source(maps, args.source, args.data_dir)
  elif args.masks:
    masks = scoring.read_masks(args.masks, maps)
  else:
    boxes = scoring.read_boxes(args.boxes, maps, order)
  result = scoring.score(maps, boxes, args.n_boot, args.seed, masks, args.protocol, order)
  for path in scoring.write_outputs(result, args.out, args.per_image):
    print(f"wrote {path}", file=sys.stderr)
  for note in result["settings"]["notes"]:
    print(f"note: {note}", file=sys.stderr)
  rows = []
  for name in scoring.protocol_names(result):
    by_cls = result[name]
    if scoring.ALL in by_cls:
      v = by_cls[scoring.ALL]["value"]
      rows.append([name, "-" if np.isnan(v) else f"{v:.4f}", str(len(by_cls) - 1)])
    else:
      vals = [e["value"] for e in by_cls.values() if not np.isnan(e["value"])]
      rows.append([name, f"{np.mean(vals):.4f}" if vals else "-", str(len(vals))])
  print(tables.markdown(["protocol", "mean over classes (RoDeO: pooled)", "classes"], rows))
  return 0
