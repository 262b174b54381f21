"""The `lsemil` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module exposing `main(argv: list[str]) -> int`
(argv excludes the program and subcommand names). Modules are imported only
when their subcommand runs, so `lsemil --help` stays fast (no JAX import).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Keep sorted by the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
  "info": ("lsemil.info", "versions, devices, default model size and GFLOPs/image"),
  "demo": ("lsemil.demo", "the whole method on a synthetic dataset, on a CPU"),
  "synth": ("lsemil.data.synth", "write a synthetic dataset in the NIH ChestX-ray14 layout"),
  "stats": ("lsemil.data.stats", "print Table 1 (split and box statistics) of an NIH folder"),
  "prepare": ("lsemil.data.prepare", "resize an NIH folder to 512x512 PNGs or a TFDS dataset"),
  "train": ("lsemil.main", "train a model (configs/*.py) into a workdir"),
  "evaluate": ("lsemil.evaluate", "AUC, DICE and IoBB of a checkpoint on a split"),
  "reproduce": ("lsemil.reproduce", "the paper's Tables 1-3 and Figures 1/3 from runs"),
  "predict": ("lsemil.predict", "class probabilities and saliency overlays for images"),
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
  return int(module.main(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
