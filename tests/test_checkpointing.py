"""Checkpoints (lsemil.runtime.checkpointing) and exact resume of training (paper Sec 4.2).

Fast tests build states from the smoke model's shapes without compiling it. The slow test
trains 2N steps straight and N + (exit) + N resumed in separate processes and requires
identical parameters; it also stops a run on an injected NaN batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsemil.core.configuration import load_config
from lsemil.models import mil
from lsemil.runtime import checkpointing
from lsemil.training import trainer

REPO = Path(__file__).resolve().parents[1]


def _state(config, fill: float) -> trainer.TrainState:
  """A TrainState with the smoke model's structure, every float leaf = fill (no compile)."""
  model = mil.from_config(config.model)
  tx = trainer.create_optimizer(config)
  abstract = trainer.abstract_state(model, tx, 0)
  return jax.tree.map(lambda a: jnp.full(a.shape, fill, a.dtype), abstract)


def _iter():
  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def test_save_restore_roundtrip_state_and_iterator(tmp_path):
  config = load_config("smoke")
  state = _state(config, 0.5).replace(step=jnp.int32(3))
  it = _iter()
  for _ in range(3):
    next(it)
  mngr = checkpointing.create_manager(tmp_path, keep=2)
  checkpointing.save(mngr, 3, state, it, config=config, meta={"epoch": 1.5}, metrics=None)
  mngr.wait_until_finished()
  expected_next = next(it)  # the batch a resumed run must see first

  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ),
    _state(config, 0.0),
  )
  fresh = _iter()
  restored, meta = checkpointing.restore(mngr, 3, abstract, fresh)
  mngr.close()
  assert meta == {"epoch": 1.5}
  assert int(restored.step) == 3
  np.testing.assert_array_equal(next(fresh), expected_next)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_latest_and_best_and_load_inference(tmp_path):
  config = load_config("smoke")
  mngr = checkpointing.create_manager(tmp_path, keep=2)
  it = _iter()
  aucs = {2: 0.9, 4: 0.6, 3: None}  # step 3 evaluated but AUC undefined (NaN)
  for step in range(1, 6):
    metrics = {checkpointing.BEST_METRIC: aucs[step]} if step in aucs else None
    meta = {"last_eval": {"step": step, "val_mean_auc": aucs.get(step)}}
    checkpointing.save(
      mngr, step, _state(config, float(step)), it, config=config, meta=meta, metrics=metrics
    )
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2, 4, 5]  # latest two + best (1 and 3 deleted)
  assert checkpointing.best_step(mngr) == 2
  mngr.close()

  cfg, model, variables, step, info = checkpointing.load_inference(tmp_path)
  assert step == 2 and info["val_mean_auc"] == 0.9
  assert cfg.model.saliency_size == config.model.saliency_size
  assert isinstance(model, mil.MultiResolutionMIL)
  assert set(variables) == {"params", "batch_stats"}
  leaves = jax.tree.leaves(variables)
  assert all(isinstance(x, np.ndarray) for x in leaves)
  assert all(np.all(x == 2.0) for x in leaves)

  assert checkpointing.load_inference(tmp_path, which="latest")[3] == 5
  step_dir = tmp_path / checkpointing.CHECKPOINT_DIR / "4"
  _, _, variables, step, info = checkpointing.load_inference(step_dir)
  assert step == 4 and info["val_mean_auc"] == 0.6
  assert np.all(variables["params"]["head"]["kernel"] == 4.0)

  with pytest.raises(FileNotFoundError):
    checkpointing.load_inference(tmp_path / "nothing_here")
  with pytest.raises(ValueError, match="which"):
    checkpointing.load_inference(tmp_path, which="worst")


def test_metric_ranks_nan_and_missing_last():
  assert checkpointing._metric({checkpointing.BEST_METRIC: 0.1}) == 0.1
  assert checkpointing._metric({checkpointing.BEST_METRIC: float("nan")}) == -np.inf
  assert checkpointing._metric({checkpointing.BEST_METRIC: None}) == -np.inf
  assert checkpointing._metric(None) == -np.inf


# --------------------------------------------------------------------------- slow: resume

# Every run uses the smoke model, so the compiled steps are the same: the persistent
# compilation cache shared by the subprocesses makes every run after the first cheap.
_RUN = textwrap.dedent(
  """
  import json, sys
  import numpy as np
  from lsemil.runtime import sharding
  from lsemil.training import trainer
  from lsemil.core.configuration import load_config

  workdir, data_dir, num_steps, nan_at, init_from = sys.argv[1:6]
  config = load_config("smoke")
  config.train.init_from = init_from
  config.train.num_steps = int(num_steps)
  config.train.eval_every_steps = 2
  if int(nan_at):
    # Poison the `nan_at`-th train batch of this process (same compiled step); a train
    # batch is a dict with labels, the inference path passes bare image arrays.
    real, calls = sharding.global_batch, [0]
    def poisoned(local, sh):
      if isinstance(local, dict) and "labels" in local:
        calls[0] += 1
        if calls[0] == int(nan_at):
          local = dict(local, labels=np.full_like(local["labels"], np.nan))
      return real(local, sh)
    sharding.global_batch = poisoned
  try:
    out = trainer.train_and_evaluate(config, workdir, data_dir=data_dir)
  except trainer.NonFiniteLossError as e:
    out = {"error": str(e)}
  print("RESULT " + json.dumps(out))
  """
)


def _env(cache: Path) -> dict:
  return dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # cheaper CPU compiles; every run shares it
  )


def _run(workdir, data_dir, num_steps, *, cache, nan_at=0, init_from=""):
  args = [str(workdir), str(data_dir), str(num_steps), str(nan_at), str(init_from)]
  proc = subprocess.run(
    [sys.executable, "-c", _RUN, *args],
    env=_env(cache),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :]), proc.stdout + proc.stderr


@pytest.mark.slow
def test_cli_smoke_run_then_exact_resume_and_nan_stop(tmp_path):
  """`lsemil train` on the smoke config with no data (it synthesizes W/data), 4 steps;
  then 2 steps + exit + 2 resumed steps elsewhere give bit-identical weights."""
  cache, a = tmp_path / "jax_cache", tmp_path / "a"
  cmd = [sys.executable, "-m", "lsemil.commands.cli", "train", "--config", "configs/smoke.py"]
  cmd += ["--workdir", str(a), "--config.train.num_steps=4"]
  cmd += ["--config.train.eval_every_steps=2", "--config.train.checkpoint_every_steps=1"]
  proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout + proc.stderr
  assert "synthesizing" in out
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith(f"best checkpoint: {a / 'checkpoints'}") and "validation mean AUC" in last
  # Files: config, metrics (train every step, eval at 2 and 4), TensorBoard events.
  config = json.loads((a / "config.json").read_text())
  assert config["train"]["num_steps"] == 4 and config["data"]["data_dir"] == str(a / "data")
  records = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
  evals = [r for r in records if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [2, 4]
  assert len(evals[0]["val_per_class_auc"]) == 14 and 0 <= evals[0]["val_mean_auc"] <= 1
  assert any(p.name.startswith("events.out.tfevents") for p in (a / "tb").iterdir())
  # keep_checkpoints=2 plus the best: step 1 (saved every step) is gone.
  kept = sorted(int(p.name) for p in (a / "checkpoints").iterdir() if p.name.isdigit())
  best = json.loads((a / "result.json").read_text())
  assert 1 not in kept and {3, 4} <= set(kept) and best["best_step"] in kept
  assert best["best_step"] == max(evals, key=lambda r: r["val_mean_auc"])["step"]

  # N steps, process exit, N resumed steps == 2N straight, bit for bit.
  b = tmp_path / "b"
  half, _ = _run(b, a / "data", 2, cache=cache)
  assert half["last_step"] == 2
  resumed, log = _run(b, a / "data", 4, cache=cache)
  assert "resuming from" in log and resumed["last_step"] == 4
  _, _, va, sa, _ = checkpointing.load_inference(a, which="latest")
  _, _, vb, sb, _ = checkpointing.load_inference(b, which="latest")
  assert sa == sb == 4
  for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb), strict=True):
    np.testing.assert_array_equal(x, y)
  assert resumed["best_val_mean_auc"] == pytest.approx(best["best_val_mean_auc"])

  # Running again on a finished workdir trains nothing and reports the same best.
  config = load_config("smoke")
  config.train.num_steps, config.train.eval_every_steps = 4, 2
  again = trainer.train_and_evaluate(config, a, data_dir=a / "data")
  assert again["best_step"] == best["best_step"] and again["last_step"] == 4
  assert len((a / "metrics.jsonl").read_text().splitlines()) == len(records)

  # A NaN batch at step 3 (first resumed step) stops the run naming the step; step 2 stays.
  shutil.copytree(b / "checkpoints" / "2", tmp_path / "c" / "checkpoints" / "2")
  out, _ = _run(tmp_path / "c", a / "data", 4, cache=cache, nan_at=1)
  assert "at step 3" in out["error"] and "step 2" in out["error"]
  assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").iterdir()) == ["2"]

  # init_from: a new workdir starts from run a's best weights (fresh optimizer, step 0).
  out, log = _run(tmp_path / "d", a / "data", 2, cache=cache, init_from=a)
  assert f"initialised weights from {a} (step {best['best_step']})" in log
  assert out["last_step"] == 2
