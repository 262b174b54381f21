"""`lsemil predict`: class probabilities and saliency overlays for image files (Sec 3.6, 4.4).

  lsemil predict --checkpoint C IMG [IMG ...] [--out DIR] [--threshold 0.5]
                 [--boxes [--box-tau 0.5]] [--calibration F_calibration.json]
                 [--saliency model|gradcam|cam] [--gradcam-level L] [--multiframe first|refuse]
                 [--operating-points auto|none]

C is a training workdir (its best checkpoint), its checkpoints/ folder or one step folder,
local or gs://. See `lsemil.workflows.prediction` for what is computed and written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lsemil.commands import arguments, progress
from lsemil.core import fileio
from lsemil.core.errors import OutputError
from lsemil.data import dicom, findings
from lsemil.inference import engine
from lsemil.models import registry
from lsemil.workflows import prediction


def _probability(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil predict",
    description="""
    Per-class probabilities and saliency overlays (Yao et al. 2018, Sec 3.6) for PNG / JPEG / DICOM
    chest X-rays. Prints a table; writes DIR/predictions.csv and DIR/<image>_<class>.png for each
    class at or above --threshold. Exit status 1 if any file could not be read (the others still
    complete).""",
  )
  p.add_argument(
    "--checkpoint",
    required=True,
    help="a training workdir, its checkpoints/ folder or a step folder (local or gs://)",
  )
  p.add_argument("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, DICOM)")
  p.add_argument(
    "--out",
    default="predictions",
    help="output folder for predictions.csv and overlays (default ./predictions)",
  )
  p.add_argument(
    "--threshold",
    type=_probability,
    default=0.5,
    help="probability at or above which a class gets an overlay (default 0.5)",
  )
  arguments.add_which(p, "checkpoint of a workdir (default best validation mean AUC)")
  p.add_argument(
    "--batch-size", type=arguments.positive_int, default=16, help="images per forward (16)"
  )
  p.add_argument(
    "--boxes",
    action="store_true",
    help="also write DIR/" + prediction.BOXES_FILE + ": for each image and class at or above "
    "--threshold, the boxes of the saliency map thresholded at --box-tau (connected "
    "components, as the IoBB protocol), in the input image's own pixels, with their peak and "
    "mean saliency; the boxes are drawn on the overlays too",
  )
  p.add_argument(
    "--box-tau",
    type=_probability,
    default=0.5,
    help="saliency threshold tau of --boxes (default 0.5; maps lie in [0, 1])",
  )
  p.add_argument(
    "--calibration",
    metavar="FILE",
    help="recalibrate the probabilities with the parameters `lsemil evaluate --calibrate` "
    "wrote (F_calibration.json) before the threshold and the CSV (without it, a "
    "recalibration stored with the checkpoint, an export's calibration.json or the step's "
    "evaluate --calibrate fit, fills <class>_calibrated columns beside the probabilities)",
  )
  p.add_argument(
    "--saliency",
    choices=registry.ALL_SOURCES,
    default=None,
    help="saliency map source (default: model for MIL runs, the run's config.saliency.source "
    "for GAP baseline runs)",
  )
  p.add_argument(
    "--gradcam-level",
    type=int,
    default=None,
    help="down-path level of Grad-CAM (default: the run's config, else -1 = the coarsest)",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--operating-points",
    choices=("auto", "none"),
    default="auto",
    help="auto (default): where the checkpoint has per-class thresholds (an export's "
    "thresholds.json, or `lsemil evaluate --split valid` of the step in its workdir), add a "
    "<class>_decision column per class (p >= threshold, on the uncalibrated probability) "
    "and print the rule; none: no decisions",
  )
  p.add_argument(
    "--multiframe",
    choices=dicom.MULTIFRAME,
    default="first",
    help="a multi-frame DICOM: 'first' predicts its first frame with a warning naming the file "
    "and its frame count (default), 'refuse' skips it as an unreadable file",
  )
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  if fileio.is_remote(args.out):
    raise OutputError(f"--out {args.out}: predict writes overlays to a local folder")
  loaded = engine.load(args.checkpoint, args.which)
  classes = findings.of_config(loaded.config)
  calibration = (
    prediction.load_calibration(args.calibration, classes) if args.calibration else None
  )
  print(f"checkpoint {loaded.checkpoint} (step {loaded.step})", file=sys.stderr)
  ops = prediction.stored_thresholds(loaded) if args.operating_points == "auto" else None
  # The recalibration stored with the checkpoint goes beside the probabilities, unless
  # --calibration already recalibrates them.
  stored = prediction.stored_calibration(loaded) if calibration is None else None
  if stored is not None:
    print(
      f"calibrated probabilities ({stored['method']}, fitted on the valid split) in the "
      "<class>_calibrated columns",
      file=sys.stderr,
    )
  if ops is not None:
    print(
      f"decisions: p >= per-class thresholds ({ops.get('rule')} rule, chosen on the "
      f"{ops.get('fit_split', 'valid')} split) in the <class>_decision columns",
      file=sys.stderr,
    )
  if calibration is not None:
    print(
      f"probabilities recalibrated ({calibration['method']}, {args.calibration})", file=sys.stderr
    )
  out = fileio.resolve(args.out)
  with progress.bars(not args.no_progress) as bar:
    rows, failures = prediction.predict_files(
      loaded, args.images, out, threshold=args.threshold, batch_size=args.batch_size,
      progress=bar, boxes=args.boxes, box_tau=args.box_tau, calibration=calibration,
      saliency_source=args.saliency, gradcam_level=args.gradcam_level,
      multiframe=args.multiframe, thresholds=ops["thresholds"] if ops else None,
      calibrated=stored,
    )  # fmt: skip
  print(prediction.format_table(rows, args.threshold, classes))
  n_over = sum(len(r["overlays"]) for r in rows)
  wrote = f"wrote {Path(out) / 'predictions.csv'} and {n_over} overlays"
  if args.boxes:
    n_boxes = sum(len(b) for r in rows for b in r["boxes"].values())
    wrote += f"; {n_boxes} boxes in {Path(out) / prediction.BOXES_FILE}"
  print(wrote, file=sys.stderr)
  if failures:
    print(
      f"lsemil predict: {len(failures)} of {len(args.images)} files failed: "
      + ", ".join(p for p, _ in failures),
      file=sys.stderr,
    )
    return 1
  return 0
