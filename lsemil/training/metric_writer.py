"""A light metric writer for training runs: TensorBoard events plus a JSONL file.

Training (paper Sec 4.2) logs the loss and the validation AUCs; this writes them as

  W/metrics.jsonl   one JSON object per line: {"step", "kind": "train"|"eval", ...}
  W/tb/             TensorBoard event files (TFRecord of `Event` protos, no TF needed)

Only process 0 writes (`enabled=False` elsewhere makes every call a no-op).

Resuming: the writer takes the step training resumes from (`resume_step`). Lines of
metrics.jsonl with a later step were written after the last checkpoint and are about to
be written again, so they are dropped (as are duplicate (step, kind) lines and a torn last
line); the new event file starts with TensorBoard's purge marker at `resume_step + 1`, so
TensorBoard hides the old events of those steps too. One line per step and kind remains.

Failures never leave a corrupt file: every record is written whole with one `os.write`; on
any error (a full disk) the file is truncated back to its last good length and
`lsemil.core.errors.OutputError` names the file and the errno text. Events are written in the
calling thread (no background writer that could die or block on a full disk).

Remote workdirs (gs://..., through etils.epath, where objects cannot be appended to): the
events are written to a local temporary folder and copied over on `flush` and `close`;
metrics.jsonl is rewritten whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import tempfile
import time
from typing import Any

from etils import epath

from lsemil.core import fileio
from lsemil.core.errors import OutputError

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

json_safe = fileio.json_safe  # numpy -> Python, NaN/inf -> None (kept for callers)


def _error(path, e: OSError) -> OutputError:
  return OutputError(f"{path}: cannot write ({e.strerror or e})")


class _AppendFile:
  """A local file appended to in whole records; a failed write is undone (truncated)."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      self._good = os.fstat(self._fd).st_size
    except OSError as e:
      raise _error(path, e) from e

  def append(self, data: bytes) -> None:
    try:
      view = memoryview(data)
      while view:  # os.write may write part of a record; a retry reports the real error
        view = view[os.write(self._fd, view) :]
    except OSError as e:
      try:
        os.ftruncate(self._fd, self._good)
      except OSError:
        pass
      raise _error(self.path, e) from e
    self._good += len(data)

  def sync(self) -> None:
    try:
      os.fsync(self._fd)
    except OSError as e:
      raise _error(self.path, e) from e

  def close(self) -> None:
    os.close(self._fd)


def _record(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
  from tensorboardX.record_writer import masked_crc32c

  header = struct.pack("Q", len(data))
  return (
    header
    + struct.pack("I", masked_crc32c(header))
    + data
    + struct.pack("I", masked_crc32c(data))
  )


def _event(step: int = 0, **fields):
  from tensorboardX.proto import event_pb2

  return event_pb2.Event(wall_time=time.time(), step=int(step), **fields)


def _kept_lines(text: str, resume_step: int | None) -> tuple[list[str], int]:
  """The lines to keep of an existing metrics.jsonl, and how many were dropped."""
  raw = text.splitlines()
  records: dict[tuple[int, str], str] = {}
  for line in raw:
    try:
      rec = json.loads(line)
      key = (int(rec["step"]), str(rec["kind"]))
    except (ValueError, KeyError, TypeError):
      continue  # a torn line (killed mid-write by an older version): never trusted
    if resume_step is None or key[0] <= resume_step:
      records.pop(key, None)  # a repeated (step, kind): the last one wins, in its place
      records[key] = line + "\n"
  return list(records.values()), len(raw) - len(records)


class MetricWriter:
  """Scalars to TensorBoard and JSONL lines to W/metrics.jsonl (process 0 only)."""

  def __init__(
    self, workdir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None
  ):
    """`resume_step`: the step training continues from (0 from scratch); lines of later
    steps are dropped. None keeps every existing line. Remote (copy-on-flush) mode is
    chosen by the path: a URL such as gs://."""
    self.enabled = enabled
    self.workdir = epath.Path(workdir)
    self.remote = fileio.is_remote(workdir)
    self.dropped = 0  # lines dropped from an existing metrics.jsonl
    self._lines: list[str] = []
    self._jsonl: _AppendFile | None = None
    self._events: _AppendFile | None = None
    self._tmp: str | None = None
    if not enabled:
      return
    path = self.workdir / METRICS_FILE
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      if self.remote:
        _invalidate_listing(path)
      old = path.read_text() if path.exists() else ""
    except OSError as e:
      raise _error(path, e) from e
    lines, self.dropped = _kept_lines(old, resume_step)
    if self.remote:
      self._lines = lines
      self._tmp = tempfile.mkdtemp(prefix="lsemil_tb_")
      tb_dir = self._tmp
    else:
      if self.dropped or not old.endswith("\n") and old:
        try:
          fileio.write_text(path, "".join(lines))  # atomic: the old file or the new one
        except OSError as e:
          raise _error(path, e) from e
      self._jsonl = _AppendFile(os.fspath(path))
      tb_dir = os.fspath(self.workdir / TB_DIR)
      try:
        os.makedirs(tb_dir, exist_ok=True)
      except OSError as e:
        raise _error(tb_dir, e) from e
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._events = _AppendFile(os.path.join(tb_dir, name))
    self._add_event(_event(file_version="brain.Event:2"))
    if resume_step is not None:
      from tensorboardX.proto import event_pb2

      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._add_event(_event(int(resume_step) + 1, session_log=start))

  def _add_event(self, event) -> None:
    self._events.append(_record(event.SerializeToString()))

  def write(self, step: int, scalars: dict[str, Any], *, kind: str) -> None:
    """One JSONL line {"step", "kind", **scalars}; numeric scalars also go to TensorBoard
    as `<kind>/<name>`."""
    if not self.enabled:
      return
    from tensorboardX.proto import summary_pb2

    record = {"step": int(step), "kind": kind, **json_safe(scalars)}
    line = json.dumps(record) + "\n"
    if self._jsonl is not None:
      self._jsonl.append(line.encode())
    else:
      self._lines.append(line)
    values = []
    for name, value in scalars.items():
      if value is None or isinstance(value, bool | str | list | tuple | dict):
        continue
      try:
        value = float(value)
      except (TypeError, ValueError):
        continue
      if math.isfinite(value):
        values.append(summary_pb2.Summary.Value(tag=f"{kind}/{name}", simple_value=value))
    if values:
      self._add_event(_event(step, summary=summary_pb2.Summary(value=values)))

  def write_text(self, name: str, text: str) -> None:
    if self.enabled:
      from tensorboardX import summary

      self._add_event(_event(0, summary=summary.text(name, f"```\n{text}\n```")))

  def flush(self) -> None:
    if not self.enabled:
      return
    self._events.sync()
    if self._jsonl is not None:
      self._jsonl.sync()
    self._upload()

  def _upload(self) -> None:
    """Remote workdirs: rewrite metrics.jsonl and copy the event files over."""
    if not self.remote:
      return
    path = self.workdir / METRICS_FILE
    try:
      fileio.write_text(path, "".join(self._lines))
      dest = self.workdir / TB_DIR
      dest.mkdir(parents=True, exist_ok=True)
      for name in os.listdir(self._tmp):
        path = dest / name
        epath.Path(os.path.join(self._tmp, name)).copy(path, overwrite=True)
    except OSError as e:
      raise _error(path, e) from e

  def close(self) -> None:
    """Flushes and closes; idempotent. The files are closed even when the flush fails."""
    if not self.enabled:
      return
    self.enabled = False
    try:
      self._events.sync()
      self._upload()
    finally:
      self._events.close()
      if self._jsonl is not None:
        self._jsonl.close()
      if self._tmp is not None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _invalidate_listing(path: epath.Path) -> None:
  """gcsfs caches listings per process: forget what it knows of `path`'s folder so that a
  file another process wrote (or removed) since is seen."""
  try:
    from etils.epath import backend

    backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache(os.fspath(path.parent))
  except (ImportError, AttributeError):
    pass
