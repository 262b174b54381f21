"""The `lsemil` command line: a thin dispatcher over the command modules.

Each command lives in `lsemil/commands/<name>.py` exposing `main(argv: list[str]) -> int`
(argv excludes the program and command names). Modules are imported only when their
command runs, so `lsemil --help` stays fast (no JAX import).

Errors: a `lsemil.core.errors.UserError` (bad data, image, config, checkpoint or output) is
printed as one line `lsemil <command>: <message>`, on a line of its own (any progress bar
still open is closed first) with exit status 1 in every command
(75 for a training run stopped by SIGTERM / SIGINT after saving); anything else is a bug and
propagates with its traceback. Bad arguments exit 2 (argparse).
"""

from __future__ import annotations

import importlib
import sys

from lsemil.commands import progress
from lsemil.core.errors import EXIT_USER_ERROR, UserError

# name -> (module, one-line help). Keep sorted by the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
  "info": ("lsemil.commands.info", "versions, devices, default model size and GFLOPs/image"),
  "demo": ("lsemil.commands.demo", "the whole method on a synthetic dataset, on a CPU"),
  "synth": ("lsemil.commands.synth", "write a synthetic dataset in the layout of a source (NIH)"),
  "stats": ("lsemil.commands.stats", "print Table 1 (split and box statistics) of a dataset"),
  "prepare": ("lsemil.commands.prepare", "resize an NIH folder to 512x512 PNGs or a TFDS dataset"),
  "train": ("lsemil.commands.train", "train a model (configs/*.py) into a workdir"),
  "evaluate": ("lsemil.commands.evaluate", "AUC, DICE and IoBB of a checkpoint on a split"),
  "reproduce": ("lsemil.commands.reproduce", "the paper's Tables 1-3 and Figures 1/3 from runs"),
  "predict": ("lsemil.commands.predict", "class probabilities and saliency overlays for images"),
  "export": ("lsemil.commands.export", "a run as a folder: safetensors, ONNX, config, model card"),
  "serve": ("lsemil.commands.serve", "a local web viewer: drop X-rays, see findings and maps"),
  "score": ("lsemil.commands.score", "cheXlocalize's mIoU and hit rate of any model's maps"),
  "aot": ("lsemil.commands.aot", "compile for a TPU topology here: HBM fit, sharding, step time"),
}


def _usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [
    "usage: lsemil <command> [options]",
    "",
    "Multi-resolution MIL with LSE-LBA pooling (Yao et al. 2018), in JAX/Flax.",
    "",
    "commands:",
  ]
  lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
  lines += ["", "Run `lsemil <command> --help` for a command's options."]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  if argv[0] in ("-V", "--version"):
    from lsemil import __version__

    print(f"lsemil {__version__}")
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"lsemil: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  module = importlib.import_module(COMMANDS[name][0])
  try:
    return int(module.main(rest) or 0)
  except UserError as e:
    progress.close_all()  # a bar left open by the failed step must not share the line
    print(f"lsemil {name}: {e}", file=sys.stderr)
    return int(getattr(e, "exit_code", EXIT_USER_ERROR))


if __name__ == "__main__":
  sys.exit(main())
