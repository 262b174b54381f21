"""`lsemil serve`: a local web viewer of a model (`lsemil.workflows.viewing`).

  lsemil serve --model PATH [--host 127.0.0.1] [--port 0|N] [--browse REPRODUCE_DIR]

PATH is what `lsemil predict --checkpoint` takes: a training workdir, its checkpoints/ folder,
a step folder or an `lsemil export` folder. Prints the URL, then serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys

from lsemil.commands import arguments
from lsemil.core import log
from lsemil.inference import engine
from lsemil.workflows import viewing


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil serve",
    description="""
    A web page on this machine to drop PNG / JPEG / DICOM chest X-rays on: the findings sorted
    by probability with their decisions, each class's saliency overlay with its colour scale
    and boxes, and the JSON to download; with --browse, also a `lsemil reproduce` report. No
    file leaves the machine and the page loads nothing from the network.""",
  )
  p.add_argument(
    "--model",
    required=True,
    help="a training workdir, its checkpoints/ folder, a step folder or an export folder",
  )
  arguments.add_which(p, "checkpoint of a workdir (default best validation mean AUC)")
  p.add_argument(
    "--host",
    default="127.0.0.1",
    help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 lets anyone "
    "on the network upload images and read --browse)",
  )
  p.add_argument(
    "--port",
    type=arguments.nonnegative_int,
    default=0,
    help="port to listen on (default 0: a free port, printed with the URL)",
  )
  p.add_argument(
    "--browse",
    metavar="DIR",
    help="a `lsemil reproduce --out` folder to show under /browse/ (its index.html and "
    "figures; no file outside it is served)",
  )
  return p


def _interrupt(signum, frame):
  raise KeyboardInterrupt


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  viewing.browse_folder(args.browse)  # before the model loads
  loaded = engine.load(args.model, args.which)
  print(f"checkpoint {loaded.checkpoint} (step {loaded.step})", file=sys.stderr)
  if args.host not in viewing.LOOPBACK:
    log.warning(f"lsemil serve: listening on {args.host}: other machines can reach the viewer")
  signal.signal(signal.SIGTERM, _interrupt)  # the temp folder of uploads is removed
  viewer = viewing.Viewer(loaded)
  with viewing.serving(viewer, host=args.host, port=args.port, browse=args.browse) as server:
    print(f"serving {viewing.url(server)}  (Ctrl-C stops)", flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      print("stopped", file=sys.stderr)
  return 0
