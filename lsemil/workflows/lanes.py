"""Training runs side by side on a CPU, one core each (`lsemil demo`).

XLA:CPU spreads one small model's train step poorly over cores. On the 2-core development
host the demo config's step ran at 35 images/s pinned to one core and 42-48 on both, while
two runs pinned to one core each ran at 36 + 38 = 74 together (benchmarks/train_step.py
under `taskset`, README). So `lsemil demo` trains its runs as `lsemil train` subprocesses,
each pinned to one core (`os.sched_setaffinity`, then exec), as many at a time as this
process may use cores, longest first.

A pinned run computes with one thread, so its numbers do not depend on how many cores the
machine has or how many runs share it: XLA partitions CPU work by the core count, which is
what made two-core and one-core trainings of one config differ (README). Each run's output
is appended to `WORKDIR/train.log`; the parent prints a line when a run starts and ends and, every
`progress_s` seconds, each running run's epoch (from its `metrics.jsonl`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lsemil.core import configuration, log
from lsemil.core.errors import EXIT_PREEMPTED, Interrupted, OutputError

STAGE = "train runs"  # the progress stage of `run`, counted in epochs
_STOP_GRACE_S = 300  # a stopped run finishes its step and writes its checkpoint first


@dataclasses.dataclass(frozen=True)
class Job:
  """One `lsemil train` run: `config` is a load_config spec such as 'demo:r0=5'."""

  key: str
  config: str
  workdir: Path
  data_dir: Path
  epochs: int | None = None  # None: the config's train.num_epochs

  @property
  def log(self) -> Path:
    return self.workdir / "train.log"


def available_cores() -> list[int]:
  """The cores this process may run on (its affinity mask, not the machine's count)."""
  return sorted(os.sched_getaffinity(0))


def command(job: Job) -> list[str]:
  """The `lsemil train` command line of `job` (the config as a file path, as users pass it)."""
  name, _, arg = job.config.partition(":")
  spec = str(configuration.config_path(name)) + (f":{arg}" if arg else "")
  return [
    sys.executable,
    "-m",
    "lsemil.commands.cli",
    "train",
    "--config",
    spec,
    "--workdir",
    str(job.workdir),
    "--data-dir",
    str(job.data_dir),
    *([f"--config.train.num_epochs={int(job.epochs)}"] if job.epochs else []),
  ]


# Pins itself to one core, then execs the command: the affinity is set before any thread
# exists, without a preexec_fn (a fork callback in a process that already runs jax's threads).
_PIN = (
  "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execv(sys.argv[2], sys.argv[2:])"
)


def _start(job: Job, core: int) -> subprocess.Popen:
  job.workdir.mkdir(parents=True, exist_ok=True)
  with open(job.log, "a") as log:  # appended: a resumed run keeps its history; the child
    # keeps its own descriptor
    return subprocess.Popen(
      [sys.executable, "-c", _PIN, str(core), *command(job)],
      stdout=log,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      env=dict(os.environ, PYTHONUNBUFFERED="1"),
      start_new_session=True,  # Ctrl-C reaches the parent only; it stops each run once
    )


def _epoch(job: Job) -> float | None:
  """The epoch of the last training line of the run's metrics.jsonl, if any."""
  try:
    with open(job.workdir / "metrics.jsonl", "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 4096))
      lines = f.read().decode("utf-8", "replace").splitlines()
  except OSError:
    return None
  for line in reversed(lines):
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if record.get("kind") == "train" and "epoch" in record:
      return float(record["epoch"])
  return None


def _num_epochs(job: Job) -> int:
  return int(job.epochs or configuration.load_config(job.config).train.num_epochs)


def _epochs_done(jobs, running: dict, results: dict, epochs: dict) -> float:
  """Epochs trained over all jobs: a finished job's all, a running one's from its log."""
  done = 0.0
  for job in jobs:
    if job.key in results:
      done += epochs[job.key]
    elif job.key in running:
      done += min(_epoch(job) or 0.0, epochs[job.key])
  return round(done, 1)


def _result(job: Job, rc: int) -> dict:
  if rc == EXIT_PREEMPTED:
    raise Interrupted(
      f"training {job.config} -> {job.workdir} was stopped after saving a "
      "checkpoint; run the same command again to resume"
    )
  if rc == 0:
    try:
      return json.loads((job.workdir / "result.json").read_text())
    except (OSError, ValueError) as e:
      raise OutputError(f"training {job.config} ended but {job.workdir}/result.json: {e}") from e
  tail = job.log.read_text(errors="replace").strip().splitlines()[-1:] if job.log.exists() else []
  raise OutputError(
    f"training {job.config} -> {job.workdir} failed (exit status {rc}): "
    f"{tail[0] if tail else 'no output'} (whole log: {job.log})"
  )


def _stop_all(running: dict) -> None:
  for proc, _, _, _ in running.values():
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + _STOP_GRACE_S
  for proc, _, _, _ in running.values():
    try:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def run(
  jobs: Sequence[Job],
  *,
  cores: Sequence[int] | None = None,
  say: Callable[[str], None] = log.info,
  progress_s: float = 60.0,
  progress: log.Progress | None = None,
) -> dict[str, dict]:
  """Trains `jobs` (in the given order, a free core taking the next) and returns, per job key,
  its result.json plus 'seconds' (its wall time). Raises OutputError naming the log of a run
  that failed (after stopping the others), Interrupted on Ctrl-C / SIGTERM once every run has
  saved a checkpoint: the same call then resumes them. `progress` is told the epochs trained
  over all jobs, as the stage 'train runs' (a bar with an ETA)."""
  free = list(cores if cores is not None else available_cores())
  if not free:
    raise OutputError("no CPU core is available to this process (its affinity mask is empty)")
  pending, running, results = list(jobs), {}, {}
  epochs = {job.key: _num_epochs(job) for job in jobs} if progress else {}
  last_done = None
  total, last_progress = len(jobs), time.monotonic()
  main = threading.current_thread() is threading.main_thread()
  old_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
  try:
    while pending or running:
      while pending and free:
        job, core = pending.pop(0), free.pop(0)
        say(
          f"  train {job.config} on core {core} ({total - len(pending)}/{total}) -> "
          f"{job.workdir} (log: {job.log})"
        )
        running[job.key] = (_start(job, core), job, core, time.monotonic())
      time.sleep(0.5)
      for key, (proc, job, core, t0) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        del running[key]
        free.append(core)
        if rc != 0:
          _stop_all(running)
          running.clear()
        result = _result(job, rc)
        result["seconds"] = time.monotonic() - t0
        results[key] = result
        say(
          f"  done {job.config} in {result['seconds']:.0f} s: best validation mean AUC "
          f"{float(result['best_val_mean_auc']):.4f} at step {result['best_step']}"
        )
      done = _epochs_done(jobs, running, results, epochs) if progress else None
      if progress and done != last_done:  # a bar reported finished twice would be drawn twice
        progress(STAGE, done, sum(epochs.values()))
        last_done = done
      if running and time.monotonic() - last_progress >= progress_s:
        last_progress = time.monotonic()
        parts = [f"{job.config} epoch {_epoch(job) or 0:.1f}" for _, job, _, _ in running.values()]
        say("  running: " + "; ".join(parts))
  except KeyboardInterrupt:
    _stop_all(running)
    raise Interrupted(
      "demo stopped: the running trainings saved checkpoints; run the same command again to "
      "resume them"
    ) from None
  finally:
    if main:
      signal.signal(signal.SIGTERM, old_term)
  return results
