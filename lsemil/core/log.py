"""The one log channel: library code reports here; it prints nothing and opens no bars.

  from lsemil.core import log
  log.info("training from scratch")       # process 0 only (see `set_process_index`)
  log.warning("lock heartbeat failed")    # every process

Each line goes to absl logging (the record) and to the user on stderr, through `tqdm.write`
while a tqdm bar is open so it never lands inside the bar's line. Only process 0 of a
multi-host run shows `info` lines; `warning` lines show on every process.

Long loops report progress through a `Progress` callback, `progress(stage, done, total)`,
passed in by the caller; `lsemil.commands.progress` turns it into tqdm bars (with ETA).
Library code never imports tqdm. No JAX import here: core stays light.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

_T = TypeVar("_T")
_process_index: int | None = None  # set explicitly; else asked of JAX once it runs


class Progress(Protocol):
  """`progress(stage, done, total)`: `done` of `total` items of `stage` are finished;
  `status` is a short note on the latest ones (e.g. the loss), kept until replaced."""

  def __call__(self, stage: str, done: int, total: int, status: str = "") -> None: ...


def set_process_index(index: int | None) -> None:
  """This process's index in a multi-host run (None: ask JAX once its backend is up)."""
  global _process_index
  _process_index = index


def process_index() -> int:
  if _process_index is not None:
    return _process_index
  jax = sys.modules.get("jax")
  if jax is None:
    return 0
  try:
    from jax._src import xla_bridge

    # Asking before the backend starts would start it (and break jax.distributed.initialize).
    if not xla_bridge.backends_are_initialized():
      return 0
  except (ImportError, AttributeError):
    return 0
  return int(jax.process_index())


def _show(msg: str) -> None:
  tqdm = sys.modules.get("tqdm")
  if tqdm is not None:
    tqdm.tqdm.write(msg, file=sys.stderr)  # clears and redraws any open bar
    sys.stderr.flush()
  else:
    print(msg, file=sys.stderr, flush=True)


def info(msg: str) -> None:
  """A progress or result note: recorded, and shown on process 0."""
  from absl import logging

  logging.info("%s", msg)
  if process_index() == 0:
    _show(msg)


def warning(msg: str) -> None:
  """Something the user should know that does not stop the run: shown on every process,
  as `warning: <msg>`."""
  from absl import logging

  # Recorded at info: absl shows its own warnings on stderr, which would repeat the line.
  logging.info("warning: %s", msg)
  _show(f"warning: {msg}")


def tracked(
  items: Iterable[_T], progress: Progress | None, stage: str, total: int | None = None
) -> Iterator[_T]:
  """Yields `items`, reporting each one done to `progress` (if any) as `stage`."""
  if not progress:
    yield from items
    return
  if total is None:
    items = list(items)
    total = len(items)
  progress(stage, 0, total)
  for done, item in enumerate(items, 1):
    yield item
    progress(stage, done, total)
