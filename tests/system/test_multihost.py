"""Multi-host training: 2 processes on 127.0.0.1 vs one process, same 8 devices.

Each process runs `_DRIVER`: the CLI's start-up (`sharding.maybe_initialize_distributed`
with a local coordinator; gloo collectives between the 4 fake CPU devices of each process),
then `trainer.train_and_evaluate` on the smoke config into ONE shared workdir. A reference
process with 8 devices trains the same config on the same data. The driver records, per
step, what each process fed (a checksum per example of its local train batch) and the
in-memory params after chosen steps.

Batch order: process p takes every 2nd element of the one global shuffled stream, so a
global batch of the 2-process run holds the same 8 augmented examples as the single-process
batch, in another order ([0, 2, 4, 6, 1, 3, 5, 7]). The loss and the BatchNorm statistics are
means over the batch, so the updates agree up to float summation order: params are compared
with a tolerance across runs, and exactly between the two processes of one run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from lsemil.runtime import checkpointing

REPO = Path(__file__).resolve().parents[2]
N = 2  # steps per launch: N, exit both processes, relaunch to 2N

_DRIVER = textwrap.dedent(
  """
  import json, sys
  import numpy as np
  workdir, data_dir, num_steps, dump_steps, out, coordinator, nproc, pid = sys.argv[1:9]
  from lsemil.runtime import sharding
  if int(nproc) > 1:  # the path `lsemil train --coordinator-address ...` takes
    assert sharding.maybe_initialize_distributed(coordinator, int(nproc), int(pid))
  import jax
  from etils import epath
  from lsemil.core import fileio
  from lsemil.training import metric_writer
  from lsemil.training import trainer
  from lsemil.core.configuration import load_config

  assert jax.process_count() == int(nproc) and jax.device_count() == 8
  record = {"feeds": {}, "params": {}, "writes": [], "writer_enabled": []}
  real_global_batch, real_make_train_step = sharding.global_batch, trainer.make_train_step
  pending = []

  def global_batch(local, sh):
    # A train batch (a dict with labels; the inference path passes bare image arrays): a
    # (checksum, labels code) row per local example.
    if isinstance(local, dict) and "labels" in local:
      sums = local["image"].astype(np.float64).sum(axis=(1, 2, 3))
      pending[:] = [np.stack([sums, local["labels"] @ 2.0 ** np.arange(14)], 1)]
    return real_global_batch(local, sh)

  def make_train_step(*args, **kwargs):
    step_fn = real_make_train_step(*args, **kwargs)

    def wrapped(state, batch):
      step = int(jax.device_get(state.step)) + 1
      record["feeds"][step] = pending.pop()
      new_state, metrics = step_fn(state, batch)
      if str(step) in dump_steps.split(","):
        for path, leaf in jax.tree_util.tree_leaves_with_path(new_state.params):
          shards = [np.asarray(s.data) for s in leaf.addressable_shards]
          assert all(np.array_equal(s, shards[0]) for s in shards)  # replicated locally
          record["params"][f"{step}{jax.tree_util.keystr(path)}"] = shards[0]
      return new_state, metrics

    return wrapped

  # Who writes what: the workdir's files (fileio's atomic writes, or epath directly) and the
  # metric writer.
  gpath = type(epath.Path(workdir))
  real_write_text, real_writer_init = gpath.write_text, metric_writer.MetricWriter.__init__
  real_write_bytes = fileio.write_bytes
  def write_text(self, *a, **k):
    record["writes"].append(str(self))
    return real_write_text(self, *a, **k)
  def write_bytes(path, data):
    record["writes"].append(str(path))
    return real_write_bytes(path, data)
  def writer_init(self, *a, **k):
    real_writer_init(self, *a, **k)
    record["writer_enabled"].append(self.enabled)
  gpath.write_text, metric_writer.MetricWriter.__init__ = write_text, writer_init
  fileio.write_bytes = write_bytes
  sharding.global_batch, trainer.make_train_step = global_batch, make_train_step

  config = load_config("smoke")
  config.train.num_steps = int(num_steps)
  config.train.eval_every_steps = int(num_steps)
  result = trainer.train_and_evaluate(config, workdir, data_dir=data_dir)
  arrays = {f"param:{k}": v for k, v in record["params"].items()}
  arrays.update({f"feed:{s}": v for s, v in record["feeds"].items()})
  np.savez(out, **arrays)
  print("RESULT " + json.dumps({
    "result": result, "writes": record["writes"], "writer_enabled": record["writer_enabled"],
    "process_index": jax.process_index(),
  }))
  """
)


def _launch(lsemil, workdir, data_dir, num_steps, dump_steps, outs, *, cache, nproc, port=0):
  """Starts `nproc` driver processes (8 devices in all), waits; their RESULTs + stdout."""
  procs = []
  for pid, out in enumerate(outs):
    args = [workdir, data_dir, num_steps, dump_steps, out, f"127.0.0.1:{port}", nproc, pid]
    procs.append(
      subprocess.Popen(
        [sys.executable, "-c", _DRIVER, *map(str, args)],
        env=lsemil.env(cache, devices=8 // nproc),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
      )
    )
  logs = lsemil.together(procs).wait(timeout=600)
  for pid, (rc, stdout, stderr) in enumerate(logs):
    assert rc == 0, f"process {pid} of {nproc} exited {rc}:\n{stdout[-2000:]}\n{stderr[-5000:]}"
  results = []
  for _, stdout, stderr in logs:
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    results.append(dict(json.loads(line[len("RESULT ") :]), stdout=stdout, stderr=stderr))
  return results


def _free_port() -> int:
  import portpicker

  return portpicker.pick_unused_port()


def _load(path: Path) -> tuple[dict, dict]:
  """(params by 'step[path]', feeds by step) from a driver's .npz."""
  with np.load(path) as z:
    params = {k[len("param:") :]: z[k] for k in z.files if k.startswith("param:")}
    feeds = {int(k[len("feed:") :]): z[k] for k in z.files if k.startswith("feed:")}
  return params, feeds


def _rows(a: np.ndarray) -> list[tuple]:
  return sorted(map(tuple, a.tolist()))


@pytest.mark.multiprocess
def test_two_processes_train_and_resume_like_one(tmp_path, synth_dir, jax_cache, lsemil):
  cache = jax_cache
  # Reference: one process, 8 devices, 2N straight steps; params after N and 2N.
  ref = tmp_path / "ref"
  (ref_out,) = _launch(
    lsemil, ref, synth_dir, 2 * N, f"{N},{2 * N}", [tmp_path / "ref.npz"], cache=cache, nproc=1
  )
  assert ref_out["result"]["last_step"] == 2 * N
  ref_params, ref_feeds = _load(tmp_path / "ref.npz")
  assert sorted(ref_feeds) == list(range(1, 2 * N + 1))

  # Two processes, 4 devices each, one shared workdir: N steps, exit, relaunch to 2N.
  w = tmp_path / "multi"
  for launch, (steps, first) in enumerate([(N, 1), (2 * N, N + 1)]):
    outs = [tmp_path / f"l{launch}_p{i}.npz" for i in range(2)]
    results = _launch(
      lsemil, w, synth_dir, steps, str(steps), outs, cache=cache, nproc=2, port=_free_port()
    )
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["result"]["last_step"] == steps for r in results)
    (p0, f0), (p1, f1) = _load(outs[0]), _load(outs[1])

    # Per-process data sharding: each feeds half of every global batch, together exactly the
    # single-process run's examples (bit-identical augmented images, same labels), and the
    # relaunch continues at the next batch (the grain iterators were restored per process).
    assert sorted(f0) == sorted(f1) == list(range(first, steps + 1))
    for s in f0:
      assert f0[s].shape == f1[s].shape == (4, 2)
      assert _rows(np.concatenate([f0[s], f1[s]])) == _rows(ref_feeds[s]), f"step {s}"
      assert not set(map(tuple, f0[s].tolist())) & set(map(tuple, f1[s].tolist()))

    # Both processes hold identical params, equal to the single-process run's.
    assert p0.keys() == p1.keys() and len(p0) > 10
    assert all(k.startswith(f"{steps}[") for k in p0)
    for k in p0:
      np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
      np.testing.assert_allclose(p0[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if launch:  # the relaunch really trained on from step N
      assert any(not np.allclose(p0[k], ref_params[k.replace(f"{steps}[", f"{N}[", 1)]) for k in p0)

    # Only process 0 writes the workdir's files and metrics (orbax writes its own).
    ckpt = str(w / "checkpoints")
    writes = [sorted({Path(p).name for p in r["writes"] if ckpt not in p}) for r in results]
    assert writes[1] == [], writes
    assert {"config.json", "result.json", "validation_predictions.csv"} <= set(writes[0]), writes
    assert results[0]["writer_enabled"] == [True] and results[1]["writer_enabled"] == [False]
    started = f"resuming from {w / 'checkpoints' / str(N)}" if launch else "training from scratch"
    assert started in results[0]["stdout"] + results[0]["stderr"]  # lsemil.core.log

    # The checkpoint both processes saved restores in another (single) process.
    _, _, variables, step, _ = checkpointing.load_inference(w, which="latest")
    assert step == steps
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
      np.testing.assert_array_equal(leaf, p0[f"{steps}{jax.tree_util.keystr(path)}"])

  records = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 2 * N + 1))
  assert [r["step"] for r in records if r["kind"] == "eval"] == [N, 2 * N]
  ref_records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
  losses = [[r["loss"] for r in rs if r["kind"] == "train"] for rs in (records, ref_records)]
  assert losses[0] == pytest.approx(losses[1], rel=1e-5)
  # Validation at 2N: each process evaluates its part of every global eval batch; every
  # valid example is counted once, with the single-process run's predictions.
  (last,), (ref_last,) = (
    [r for r in rs if r["kind"] == "eval"][-1:] for rs in (records, ref_records)
  )
  assert last["step"] == ref_last["step"] == 2 * N
  assert last["val_examples"] == ref_last["val_examples"] > 0
  assert last["val_loss"] == pytest.approx(ref_last["val_loss"], rel=1e-5)
  assert last["val_mean_auc"] == pytest.approx(ref_last["val_mean_auc"], abs=1e-3)
  assert len(list((w / "tb").glob("events.out.tfevents*"))) == 2  # one per launch, process 0
  config = json.loads((w / "config.json").read_text())
  assert config["train"]["num_steps"] == 2 * N
