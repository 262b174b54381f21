"""Argument parsing shared by the commands: values checked where they are read."""

from __future__ import annotations

import argparse


def unit_floats(text: str, what: str) -> list[float]:
  """'0.1,0.5' -> [0.1, 0.5]; every value in (0, 1); raises argparse.ArgumentTypeError."""
  try:
    vals = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"{what}: expected comma-separated numbers, got {text!r}"
    ) from None
  if not vals or any(not 0 < v < 1 for v in vals):
    raise argparse.ArgumentTypeError(f"{what}: values must lie in (0, 1), got {text!r}")
  return vals


def taus(text: str) -> tuple[float, ...]:
  """argparse type of --taus."""
  return tuple(unit_floats(text, "--taus"))


def _whole_number(text: str, minimum: int) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
  return value


def positive_int(text: str) -> int:
  return _whole_number(text, 1)


def nonnegative_int(text: str) -> int:
  return _whole_number(text, 0)


def add_which(parser: argparse.ArgumentParser, help: str) -> None:
  """--which best|latest (default best): which checkpoint of a workdir a command reads."""
  parser.add_argument("--which", choices=("best", "latest"), default="best", help=help)


def add_source_options(parser: argparse.ArgumentParser) -> None:
  """--source and the label policies of `lsemil.data.index.Options` (--uncertain, --blank,
  --views, --readers), with configs/paper.py's `data` defaults; `source_options` reads them."""
  from lsemil.core import configuration
  from lsemil.data import index, sources

  data = configuration.load_config("paper").data
  parser.add_argument("--source", choices=tuple(sources.READERS), default=data.source,
                      help=f"the folder's source ({data.source})")
  for flag, choices, what in (
    ("uncertain", index.UNCERTAIN_POLICIES, "what a -1 label becomes: unknown (ignore), 0 or 1"),
    ("blank", index.BLANK_POLICIES, "what a blank label becomes: 0 or unknown"),
    ("views", index.VIEWS, "CheXpert, MIMIC-CXR: frontal views only, or all"),
    ("readers", index.READER_POLICIES,
     "VinDr-CXR: a finding is positive when any reader marks it, or most readers"),
  ):
    parser.add_argument(f"--{flag}", choices=choices, default=data[flag],
                        help=f"{what} ({data[flag]}; config.data.{flag})")


def source_options(args: argparse.Namespace) -> dict[str, str]:
  """The label policies `add_source_options` parsed, as `index.Options` keywords."""
  return {name: getattr(args, name) for name in ("uncertain", "blank", "views", "readers")}
