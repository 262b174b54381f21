"""A light metric writer for training runs: TensorBoard events plus a JSONL file.

Training (paper Sec 4.2) logs the loss and the validation AUCs; this writes them as

  W/metrics.jsonl   one JSON object per line: {"step", "kind": "train"|"eval", ...}
  W/tb/             TensorBoard event files (tensorboardX, which does not import TF)

Only process 0 writes (`enabled=False` elsewhere makes every call a no-op). Local workdirs
are appended to as we go. For remote workdirs (gs://..., through etils.epath, where files
cannot be appended to) the events are written to a local temporary folder and the files are
copied to the workdir on `flush` and `close`; the JSONL file is rewritten whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

from etils import epath

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def json_safe(value: Any) -> Any:
  """JSON-safe: numpy scalars -> Python, NaN/inf -> None, tuples -> lists."""
  if hasattr(value, "tolist"):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, list | tuple):
    return [json_safe(v) for v in value]
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  return value


class MetricWriter:
  """Scalars to TensorBoard and JSONL lines to W/metrics.jsonl (process 0 only)."""

  def __init__(
    self, workdir: str | os.PathLike, *, enabled: bool = True, remote: bool | None = None
  ):
    """`remote` (default: the path has a scheme such as gs://) selects copy-on-flush."""
    self.enabled = enabled
    self.workdir = epath.Path(workdir)
    self.remote = "://" in os.fspath(workdir) if remote is None else remote
    self._tb = None
    self._lines: list[str] = []
    self._file = None
    self._tmp = None
    if not enabled:
      return
    import tensorboardX  # lazy: only the writing process needs it

    self.workdir.mkdir(parents=True, exist_ok=True)
    path = self.workdir / METRICS_FILE
    if self.remote:
      self._tmp = tempfile.mkdtemp(prefix="lsemil_tb_")
      tb_dir = self._tmp
      if path.exists():
        self._lines = path.read_text().splitlines(keepends=True)
    else:
      tb_dir = os.fspath(self.workdir / TB_DIR)
      self._file = open(path, "a")  # noqa: SIM115  (closed in close())
    self._tb = tensorboardX.SummaryWriter(tb_dir, flush_secs=30)

  def write(self, step: int, scalars: dict[str, Any], *, kind: str) -> None:
    """One JSONL line {"step", "kind", **scalars}; numeric scalars also go to TensorBoard
    as `<kind>/<name>`."""
    if not self.enabled:
      return
    record = {"step": int(step), "kind": kind, **json_safe(scalars)}
    line = json.dumps(record) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
    for name, value in scalars.items():
      if value is None or isinstance(value, bool | str | list | tuple | dict):
        continue
      try:
        value = float(value)
      except (TypeError, ValueError):
        continue
      if math.isfinite(value):
        self._tb.add_scalar(f"{kind}/{name}", value, int(step))

  def write_text(self, name: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(name, f"```\n{text}\n```", 0)

  def flush(self) -> None:
    if not self.enabled:
      return
    self._tb.flush()
    self._upload()

  def _upload(self) -> None:
    """Remote workdirs: rewrite metrics.jsonl and copy the event files over."""
    if not self.remote:
      return
    (self.workdir / METRICS_FILE).write_text("".join(self._lines))
    dest = self.workdir / TB_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._tmp):
      epath.Path(os.path.join(self._tmp, name)).copy(dest / name, overwrite=True)

  def close(self) -> None:
    if not self.enabled:
      return
    self._tb.close()
    self._upload()
    if self.remote:
      shutil.rmtree(self._tmp, ignore_errors=True)
    if self._file is not None:
      self._file.close()
    self.enabled = False
