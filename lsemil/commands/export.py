"""`lsemil export`: a trained run as a folder anyone can load, without lsemil's checkpoints.

  lsemil export --workdir W --out DIR [--which best|latest] [--no-onnx]
                [--training-data auto|nih|synthetic|unknown]

DIR gets model.safetensors, config.json, preprocessing.json, model.onnx, calibration.json,
thresholds.json, metrics.json and a Hugging Face model card README.md
(`lsemil.workflows.release`). `lsemil.load(DIR)` and `lsemil predict --checkpoint DIR` read it.
"""

from __future__ import annotations

import argparse
import sys

from lsemil import __version__
from lsemil.commands import arguments
from lsemil.workflows import release


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil export",
    description="""
    Writes a training run's checkpoint as a self-contained folder: weights in safetensors, the
    config and input contract in JSON, the model in ONNX, the evaluation found in the workdir and
    a model card. Refuses a checkpoint with non-finite or changed weights.""",
  )
  p.add_argument(
    "--workdir",
    required=True,
    help="a training workdir, its checkpoints/ folder or a step folder (local or gs://)",
  )
  p.add_argument("--out", required=True, help="the folder to write (new, empty or an export)")
  p.add_argument(
    "--training-data",
    choices=release.DATA_KINDS,
    default="auto",
    help="what the run was trained on, for the model card (default auto: from the run's "
    "data folder; a prepared folder is 'unknown')",
  )
  p.add_argument("--no-onnx", action="store_true", help="skip model.onnx (no jax2onnx conversion)")
  arguments.add_which(p, "checkpoint of the workdir (default best validation mean AUC)")
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  summary = release.export(
    args.workdir, out=args.out, which=args.which, onnx=not args.no_onnx,
    data_kind=args.training_data, version=__version__,
  )  # fmt: skip
  print(f"checkpoint {summary['checkpoint']} (step {summary['step']})", file=sys.stderr)
  if "onnx_seconds" in summary:
    print(f"model.onnx converted in {summary['onnx_seconds']:.1f} s", file=sys.stderr)
  metrics = ", ".join(summary["metrics"]) or "none found"
  print(f"evaluations in metrics.json: {metrics}; training data: {summary['data_kind']}",
        file=sys.stderr)  # fmt: skip
  print(f"wrote {summary['out']}: {', '.join(summary['files'])}")
  return 0
