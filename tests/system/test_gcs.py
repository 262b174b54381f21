"""gs:// for real: the CLI against a GCS JSON API server on 127.0.0.1 (fake-gcs-server).

A TPU user's commands, as subprocesses: `lsemil train --workdir gs://...` (checkpoints,
metrics.jsonl, TensorBoard events, config.json and result.json land in the bucket), a
second `train` to more steps resumes exactly (params equal an uninterrupted run's),
`evaluate --out gs://...`, `reproduce --out gs://...` and `predict --checkpoint gs://...`.
The gs:// workdir lock is tested with real processes: refusal naming the holder, the
heartbeat, take-over of a stale lock (by one of two contenders only) and release.
Everything in the bucket is read back through gcsfs, never through the code under test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _fs():
  """A fresh gcsfs client (no listing cache from earlier reads: other processes write)."""
  import gcsfs

  return gcsfs.GCSFileSystem(skip_instance_cache=True)


def _bare(url: str) -> str:
  return url.removeprefix("gs://")


def _cli(lsemil, *args, cache=None, timeout=400) -> subprocess.CompletedProcess:
  proc = lsemil.run(*args, cache=cache, timeout=timeout)  # os.environ has the GCS variables
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  return proc


# --------------------------------------------------------------------------- the writer


def test_metric_writer_on_gcs_rewrites_whole_object_and_drops_later_steps(gcs_bucket):
  from lsemil.training import metric_writer

  w = f"{gcs_bucket}/writer"
  fs = _fs()
  old = [{"step": s, "kind": "train", "loss": float(s)} for s in (1, 2, 3)]
  fs.pipe(f"{_bare(w)}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in old).encode())
  writer = metric_writer.MetricWriter(w, resume_step=2)
  writer.write(3, {"loss": 3.5}, kind="train")
  writer.flush()
  lines = _fs().cat(f"{_bare(w)}/metrics.jsonl").decode().splitlines()
  assert [json.loads(x)["loss"] for x in lines] == [1.0, 2.0, 3.5]
  writer.close()
  events = _fs().ls(f"{_bare(w)}/tb")
  assert len(events) == 1 and "tfevents" in events[0] and _fs().size(events[0]) > 0


def test_checkpoint_folders_written_by_another_process_are_seen(gcs_bucket):
  """gcsfs caches listings per process, and other processes' writes (another host, a run
  before, a killed save) never reach that cache: after this process listed checkpoints/,
  a complete step another client adds must be found by `load_inference`, and a partial one
  (no commit_success.txt, as a killed save leaves on GCS) must be removed by a manager for
  writing, never restored from."""
  import grain
  import jax
  import jax.numpy as jnp
  from etils import epath

  from lsemil.core.configuration import load_config
  from lsemil.models import mil
  from lsemil.runtime import checkpointing
  from lsemil.training import trainer

  config = load_config("smoke")
  model = mil.from_config(config.model)
  abstract = trainer.abstract_state(model, trainer.create_optimizer(config), 0)
  w = f"{gcs_bucket}/other_writer"
  mngr = checkpointing.create_manager(w, keep=5)
  for step in (1, 2):
    state = jax.tree.map(lambda a, s=step: jnp.full(a.shape, s, a.dtype), abstract)
    it = iter(grain.MapDataset.range(10).batch(2).to_iter_dataset())
    checkpointing.save(mngr, step, state, it, config=config, meta={"epoch": step})
  mngr.close()
  listed = sorted(p.name for p in epath.Path(f"{w}/checkpoints").iterdir())  # now cached
  assert listed == ["1", "2"]
  fs, ckpts = _fs(), f"{_bare(w)}/checkpoints"
  fs.copy(f"{ckpts}/2", f"{ckpts}/4", recursive=True)  # another writer: a complete step 4
  fs.pipe(f"{ckpts}/5/model/_METADATA", b"{}")  # and a save killed mid-write
  _, _, variables, step, _ = checkpointing.load_inference(w, which="latest")
  assert step == 4
  assert all(np.all(np.asarray(x) == 2) for x in jax.tree.leaves(variables["params"]))
  checkpointing.create_manager(w).close()  # for writing: removes the partial folder
  assert sorted(p.rsplit("/", 1)[-1] for p in _fs().ls(ckpts)) == ["1", "2", "4"]


# --------------------------------------------------------------------------- the lock

_HOLD = textwrap.dedent(
  """
  import sys, time
  from lsemil.training import workdir_lock
  with workdir_lock.hold(sys.argv[1], heartbeat_s=float(sys.argv[2])) as lock:
    print("HELD", lock.holder.pid, flush=True)
    time.sleep(600)
  """
)
_CONTEND = textwrap.dedent(
  """
  import sys, time
  from lsemil.core.errors import WorkdirBusyError
  from lsemil.training import workdir_lock
  time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start at the same instant
  try:
    lock = workdir_lock.acquire(sys.argv[1], stale_after_s=5)
    print("WON", flush=True)
    time.sleep(3)
    lock.release()
  except WorkdirBusyError as e:
    print("BUSY", e, flush=True)
  """
)


def _holder(lsemil, workdir: str, heartbeat_s: float) -> subprocess.Popen:
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLD, workdir, str(heartbeat_s)], cwd=REPO, env=lsemil.env(),
    stdout=subprocess.PIPE, text=True, start_new_session=True,
  )
  line = proc.stdout.readline()
  assert line.startswith("HELD"), line
  return proc


def _lock_record(workdir: str) -> tuple[dict, int]:
  from lsemil.training.workdir_lock import LOCK_FILE

  fs = _fs()
  path = f"{_bare(workdir)}/{LOCK_FILE}"
  return json.loads(fs.cat(path)), int(fs.info(path)["generation"])


def test_gcs_lock_refuses_beats_goes_stale_and_is_taken_over(gcs_bucket, lsemil):
  from lsemil.core.errors import WorkdirBusyError
  from lsemil.training import workdir_lock

  w = f"{gcs_bucket}/locked"
  holder = _holder(lsemil, w, heartbeat_s=0.5)
  try:
    with pytest.raises(WorkdirBusyError) as err:
      workdir_lock.acquire(w, stale_after_s=30)
    message = str(err.value)
    assert message.startswith(f"{w} is in use by another `lsemil train`")
    assert f"pid {holder.pid}" in message and "last heartbeat" in message
    first, gen1 = _lock_record(w)
    time.sleep(1.5)
    second, gen2 = _lock_record(w)
    assert second["heartbeat"] > first["heartbeat"] and gen2 != gen1  # it beats
    assert second["pid"] == holder.pid and second["token"] == first["token"]
  finally:
    os.killpg(holder.pid, signal.SIGKILL)  # a vanished VM: the object stays behind
    holder.wait()
  with pytest.raises(WorkdirBusyError):
    workdir_lock.acquire(w, stale_after_s=3)  # not stale yet
  time.sleep(3.5)
  lock = workdir_lock.acquire(w, stale_after_s=3)  # stale now: taken over
  record, _ = _lock_record(w)
  assert record["pid"] == os.getpid() and record["token"] == lock.holder.token
  lock.release()
  assert not _fs().exists(f"{_bare(w)}/{workdir_lock.LOCK_FILE}")


def test_gcs_lock_stale_take_over_has_one_winner(gcs_bucket, lsemil):
  from lsemil.training import workdir_lock

  w = f"{gcs_bucket}/contended"
  stale = workdir_lock.Holder("gone-host", 1, "2020-01-01T00:00:00+00:00", 0.0, "old")
  _fs().pipe(f"{_bare(w)}/{workdir_lock.LOCK_FILE}", stale.to_json().encode())
  at = time.time() + 4.0
  procs = [
    subprocess.Popen([sys.executable, "-c", _CONTEND, w, str(at)], cwd=REPO, env=lsemil.env(),
                     stdout=subprocess.PIPE, text=True)
    for _ in range(2)
  ]
  outs = [p.communicate(timeout=60)[0].strip() for p in procs]
  assert sorted(o.split()[0] for o in outs) == ["BUSY", "WON"], outs
  busy = next(o for o in outs if o.startswith("BUSY"))
  assert "gone-host" not in busy  # the loser names the new holder, not the stale one


def test_train_into_a_locked_gcs_workdir_refuses_at_once(gcs_bucket, synth_dir, lsemil):
  w = f"{gcs_bucket}/busy"
  holder = _holder(lsemil, w, heartbeat_s=1.0)
  try:
    proc = _cli(lsemil, "train", "--config", "configs/smoke.py", "--workdir", w,
                "--data-dir", synth_dir,
                timeout=200)
  finally:
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
  assert proc.returncode == 1
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith(f"lsemil train: {w} is in use by another `lsemil train`"), line
  assert f"pid {holder.pid}" in line
  assert not _fs().exists(f"{_bare(w)}/checkpoints")  # nothing written


# --------------------------------------------------------------------------- train & co


@pytest.fixture(scope="module")
def gcs_runs(gcs_bucket, synth_dir, jax_cache, lsemil):
  """Three `lsemil train` runs into the bucket: 3 steps then resumed to 6 (`run`), and 6
  straight (`straight`); returns their URLs and the logs."""
  cache = jax_cache
  base = ["train", "--config", "configs/smoke.py", "--data-dir", synth_dir]
  run, straight = f"{gcs_bucket}/run", f"{gcs_bucket}/straight"
  logs = {}
  for name, workdir, steps in (("first", run, 3), ("resumed", run, 6), ("straight", straight, 6)):
    start = time.monotonic()
    steps_arg = f"--config.train.num_steps={steps}"
    proc = _cli(lsemil, *base, "--workdir", workdir, steps_arg, cache=cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs[name] = (proc.stdout + proc.stderr, time.monotonic() - start)
  return {"run": run, "straight": straight, "logs": logs, "data": synth_dir, "cache": cache}


def test_train_writes_every_output_into_the_bucket(gcs_runs):
  from lsemil.training import workdir_lock

  fs, run = _fs(), _bare(gcs_runs["run"])
  names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
  assert {"checkpoints", "metrics.jsonl", "tb", "config.json", "result.json"} <= names
  assert workdir_lock.LOCK_FILE not in names  # released at the end
  steps = sorted(int(p.rsplit("/", 1)[-1]) for p in fs.ls(f"{run}/checkpoints"))
  assert steps[-1] == 6 and 3 in steps  # 3 and 6: the evaluation steps
  for step in steps:
    assert fs.exists(f"{run}/checkpoints/{step}/commit_success.txt")
  records = [json.loads(x) for x in fs.cat(f"{run}/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
  events = fs.ls(f"{run}/tb")
  assert len(events) == 2 and all(fs.size(e) > 0 for e in events)  # one per process
  config = json.loads(fs.cat(f"{run}/config.json"))
  assert config["train"]["num_steps"] == 6
  result = json.loads(fs.cat(f"{run}/result.json"))
  assert result["last_step"] == 6 and result["workdir"] == gcs_runs["run"]
  assert result["best_checkpoint"].startswith(f"{gcs_runs['run']}/checkpoints/")


def test_resume_on_gcs_equals_an_uninterrupted_run(gcs_runs):
  import jax

  from lsemil.runtime import checkpointing

  log, _ = gcs_runs["logs"]["resumed"]
  assert f"resuming from {gcs_runs['run']}/checkpoints/3 (step 3)" in log
  _, _, va, sa, _ = checkpointing.load_inference(gcs_runs["run"], which="latest")
  _, _, vb, sb, _ = checkpointing.load_inference(gcs_runs["straight"], which="latest")
  assert sa == sb == 6
  for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
    np.testing.assert_array_equal(x, y)


def test_evaluate_and_reproduce_write_into_the_bucket(gcs_runs, lsemil):
  fs, run = _fs(), gcs_runs["run"]
  out = f"{run}/eval/test.json"
  proc = _cli(lsemil, "evaluate", "--workdir", run, "--out", out, "--n-boot", 0, "--no-progress",
              cache=gcs_runs["cache"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  evaluation = json.loads(_fs().cat(_bare(out)))
  assert evaluation["checkpoint"].startswith(f"{run}/checkpoints/")
  assert 0.0 <= evaluation["mean_auc"] <= 1.0

  repro = f"{gcs_runs['run']}/reproduce"
  proc = _cli(lsemil, "reproduce", "--run", f"r0=5:{run}", "--out", repro, "--figure-images", 0,
              "--n-boot", 0, "--no-progress", cache=gcs_runs["cache"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  names = {p.rsplit("/", 1)[-1] for p in _fs().ls(_bare(repro))}
  assert "summary.json" in names and any(n.startswith("table1") for n in names), names
  assert fs.exists(_bare(out))


def test_predict_from_a_gcs_checkpoint(gcs_runs, tmp_path, lsemil):
  images = sorted((Path(gcs_runs["data"]) / "images").glob("*.png"))[:2]
  proc = _cli(lsemil, "predict", "--checkpoint", gcs_runs["run"], *images, "--out", tmp_path / "p",
              "--no-progress", cache=gcs_runs["cache"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = (tmp_path / "p" / "predictions.csv").read_text().splitlines()
  assert len(rows) == 1 + len(images)
  assert all(img.name in proc.stdout for img in images)
