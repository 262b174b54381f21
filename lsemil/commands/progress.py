"""Progress bars of the commands: tqdm bars (with ETA) behind the library's `log.Progress`.

  with progress.bars(enabled=not args.no_progress) as bar:
    evaluation.evaluate_checkpoint(..., EvalOptions(progress=bar))

The library calls `bar(stage, done, total, status)`; each stage gets one bar on stderr,
closed when the stage is finished or another starts. `log` lines are written above it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from lsemil.core import log

# stage -> unit; others count images ('localization' counts (image, class) box cases)
UNITS = {"train": "step", "train runs": "epoch", "localization": "case"}
# unit -> tqdm bar_format where tqdm's own would print a float count in full
FORMATS = {
  "epoch": "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:g} epochs [{elapsed}<{remaining}]"
}


_OPEN: set[Bars] = set()  # Bars with a bar on screen (`close_all`)


class Bars:
  """A `log.Progress` that draws one tqdm bar per stage."""

  def __init__(self, unit: str = "img"):
    self.unit = unit
    self._stage: str | None = None
    self._bar = None

  def __call__(self, stage: str, done: int, total: int, status: str = "") -> None:
    from tqdm import tqdm

    if total <= 0:  # nothing to do: no bar
      return
    if stage != self._stage or self._bar is None or total != self._bar.total:
      self.close()
      self._stage = stage
      unit = UNITS.get(stage, self.unit)
      self._bar = tqdm(
        total=total, initial=done, desc=stage, unit=unit, file=sys.stderr,
        bar_format=FORMATS.get(unit),
      )  # fmt: skip
      _OPEN.add(self)
    else:
      self._bar.update(done - self._bar.n)
    if status:
      self._bar.set_postfix_str(status, refresh=False)
    if done >= total:
      self.close()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()  # ends the bar's line
    self._bar, self._stage = None, None
    _OPEN.discard(self)


def close_all() -> None:
  """Closes every bar still on screen, so that the next line (an error) starts a line."""
  for bar in list(_OPEN):
    bar.close()


@contextlib.contextmanager
def bars(enabled: bool = True, unit: str = "img") -> Iterator[log.Progress | None]:
  """A `Bars` progress callback, closed on exit; None when disabled (--no-progress)."""
  if not enabled:
    yield None
    return
  bar = Bars(unit)
  try:
    yield bar
  finally:
    bar.close()
