"""One `lsemil train` per workdir: a lock that a second run on the same workdir meets at once.

  with workdir_lock.hold(workdir):    # raises WorkdirBusyError naming the workdir and holder
    ...train...

The lock is W/.lsemil_train.lock and records its holder: host, pid, start time.

- Local workdir: the file is held with `flock` (exclusive, non-blocking). The OS drops the
  lock when the holding process ends in any way, SIGKILL included, so a killed run never
  leaves a stale lock; the file itself stays (removing it would race with a new holder).
- gs:// workdir: an object created only if absent (GCS `ifGenerationMatch=0`). The holder
  rewrites it every `heartbeat_s` seconds (30) with a new heartbeat time, each rewrite
  conditional on the generation it last wrote, and deletes it when done. A run killed
  without releasing it (a vanished VM) leaves the object behind: once its heartbeat is
  older than `stale_after_s` (180 s, six missed beats) a new run takes it over, again by a
  generation-conditional rewrite, so of two runs taking over at once exactly one wins. A
  holder whose heartbeat finds the lock taken over sets `lost` and logs an error.
  The variables LSEMIL_LOCK_HEARTBEAT_S and LSEMIL_LOCK_STALE_AFTER_S change both times.
  Staleness compares the holder's clock with the reader's: hosts must agree within minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from lsemil.core import fileio, log
from lsemil.core.errors import OutputError, UserError, WorkdirBusyError

LOCK_FILE = ".lsemil_train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0


@dataclasses.dataclass(frozen=True)
class Holder:
  host: str
  pid: int
  started: str  # ISO 8601, the holder's local time with its UTC offset
  heartbeat: float = 0.0  # time.time() of the holder's last heartbeat (gs:// only)
  token: str = ""  # tells this holding apart from a later one by the same host and pid

  @classmethod
  def me(cls) -> Holder:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return cls(socket.gethostname(), os.getpid(), now, time.time(), uuid.uuid4().hex)

  @classmethod
  def parse(cls, text: str) -> Holder | None:
    try:
      d = json.loads(text)
      return cls(str(d["host"]), int(d["pid"]), str(d["started"]), float(d.get("heartbeat", 0)),
                 str(d.get("token", "")))
    except (ValueError, KeyError, TypeError):
      return None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self)) + "\n"

  def describe(self) -> str:
    return f"host {self.host}, pid {self.pid}, started {self.started}"


def _busy(workdir: str, holder: Holder | None, extra: str = "") -> WorkdirBusyError:
  who = holder.describe() if holder else "holder not yet recorded"
  return WorkdirBusyError(
    f"{workdir} is in use by another `lsemil train` ({who}){extra}; wait for it to end or "
    "stop it, or train into another --workdir"
  )


# --------------------------------------------------------------------------- local: flock


class _LocalLock:
  def __init__(self, workdir: str):
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK_FILE)
    self.holder = Holder.me()
    self.lost = False  # never: the OS keeps a flock for as long as the process lives
    os.makedirs(workdir, exist_ok=True)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      text = os.pread(self._fd, 4096, 0).decode(errors="replace")
      os.close(self._fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise _busy(workdir, Holder.parse(text)) from None
      raise
    data = self.holder.to_json().encode()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, data, 0)

  def release(self) -> None:
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)


# --------------------------------------------------------------------------- gs://: object


def _split_gs(url: str) -> tuple[str, str]:
  bucket, _, prefix = url[len("gs://") :].partition("/")
  return bucket, f"{prefix.rstrip('/')}/{LOCK_FILE}" if prefix else LOCK_FILE


class _GcsLock:
  def __init__(self, workdir: str, *, heartbeat_s: float, stale_after_s: float):
    import google.auth.exceptions
    from google.api_core import exceptions as gexc
    from google.cloud import storage

    self._gexc = gexc
    self.workdir, self.path = workdir, f"{workdir}/{LOCK_FILE}"
    bucket, name = _split_gs(workdir)
    self._blob_name = name
    try:
      self._bucket = storage.Client().bucket(bucket)
    except google.auth.exceptions.GoogleAuthError as e:
      raise OutputError(f"{self.path}: no Google Cloud credentials for the lock ({e})") from e
    self.holder, self.lost = Holder.me(), False
    self._heartbeat_s, self._stale_after_s = heartbeat_s, stale_after_s
    try:
      self.generation = self._acquire()
    except (gexc.GoogleAPIError, OSError) as e:  # unreachable, no permission, no bucket
      raise OutputError(f"{self.path}: cannot take the workdir lock ({e})") from e
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="lsemil-lock-heartbeat", daemon=True)
    self._thread.start()

  def _write(self, holder: Holder, generation: int) -> int:
    """Writes `holder` if the object's generation is `generation` (0: absent); returns the
    new generation. Raises PreconditionFailed otherwise."""
    blob = self._bucket.blob(self._blob_name)
    blob.upload_from_string(
      holder.to_json(), content_type="application/json", if_generation_match=generation
    )
    return int(blob.generation)

  def _acquire(self) -> int:
    for _ in range(5):  # a lost race re-reads the object
      try:
        return self._write(self.holder, 0)
      except self._gexc.PreconditionFailed:
        pass
      blob = self._bucket.get_blob(self._blob_name)
      try:
        text = None if blob is None else blob.download_as_text(if_generation_match=blob.generation)
      except (self._gexc.NotFound, self._gexc.PreconditionFailed):
        text = None
      if text is None:
        continue  # released or rewritten meanwhile
      theirs = Holder.parse(text)
      beat = theirs.heartbeat if theirs else blob.updated.timestamp()
      age = time.time() - beat
      if age <= self._stale_after_s:
        extra = f", last heartbeat {age:.0f} s ago (stale after {self._stale_after_s:.0f} s)"
        raise _busy(self.workdir, theirs, extra)
      try:
        generation = self._write(self.holder, int(blob.generation))
      except self._gexc.PreconditionFailed:
        continue  # another run took it over first
      holder = theirs.describe() if theirs else "unknown holder"
      log.warning(
        f"{self.workdir}: took over a stale lock ({holder}, no heartbeat for {age:.0f} s)"
      )
      return generation
    raise _busy(self.workdir, None, ", the lock object keeps changing")

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      beat = dataclasses.replace(self.holder, heartbeat=time.time())
      try:
        self.generation = self._write(beat, self.generation)
      except (self._gexc.PreconditionFailed, self._gexc.NotFound):
        self.lost = True
        log.warning(f"{self.path}: lost the workdir lock (taken over as stale)")
        return
      except Exception as e:  # a transient network error: the next beat retries
        log.warning(f"{self.path}: lock heartbeat failed: {e}")

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    if self.lost:
      return
    with contextlib.suppress(self._gexc.NotFound, self._gexc.PreconditionFailed):
      blob = self._bucket.get_blob(self._blob_name)
      ours = blob is not None and int(blob.generation) == self.generation
      if ours:
        blob.delete(if_generation_match=self.generation)


# --------------------------------------------------------------------------- API


def _env_seconds(name: str, default: float) -> float:
  value = os.environ.get(name, "")
  return float(value) if value else default


def acquire(
  workdir: str | os.PathLike,
  *,
  heartbeat_s: float | None = None,
  stale_after_s: float | None = None,
) -> _LocalLock | _GcsLock:
  """Takes the lock of `workdir` (local or gs://) now, or raises WorkdirBusyError.

  The returned lock has `holder`, `path`, `lost` and `release()`."""
  workdir = fileio.resolve(workdir)
  heartbeat_s = _env_seconds("LSEMIL_LOCK_HEARTBEAT_S", HEARTBEAT_S) if heartbeat_s is None \
    else heartbeat_s
  stale_after_s = _env_seconds("LSEMIL_LOCK_STALE_AFTER_S", STALE_AFTER_S) \
    if stale_after_s is None else stale_after_s
  if workdir.startswith("gs://"):
    return _GcsLock(workdir, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)
  if fileio.is_remote(workdir):
    raise UserError(f"{workdir}: workdir locks support local folders and gs:// only")
  return _LocalLock(workdir)


@contextlib.contextmanager
def hold(
  workdir: str | os.PathLike,
  *,
  enabled: bool = True,
  heartbeat_s: float | None = None,
  stale_after_s: float | None = None,
) -> Iterator[_LocalLock | _GcsLock | None]:
  """Holds the lock of `workdir` for the block (`enabled=False`: a no-op yielding None, for
  the processes other than 0 of a multi-host run). Raises WorkdirBusyError at once when
  another run holds it."""
  if not enabled:
    yield None
    return
  lock = acquire(workdir, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)
  try:
    yield lock
  finally:
    lock.release()


def read_holder(workdir: str | os.PathLike) -> Holder | None:
  """The recorded holder of `workdir`'s lock, None when free or not recorded. Locally a
  dead holder's record is cleared by the OS dropping its flock, so this may show a killed
  run's record until the next `acquire`; it is for messages, not for deciding."""
  path = fileio.as_path(workdir) / LOCK_FILE
  try:
    return Holder.parse(path.read_text())
  except OSError:
    return None
