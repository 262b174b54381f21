"""Exact resume of training in real processes (paper Sec 4.2): `lsemil train` on the smoke
config, then 2N steps straight against N + (exit) + N resumed, bit for bit; a NaN batch stops
a run naming the step. Starting from another run's weights (`--init-from`) is tested in
test_finetuning.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from lsemil.core.configuration import load_config
from lsemil.runtime import checkpointing
from lsemil.training import trainer

REPO = Path(__file__).resolve().parents[2]

# Every run uses the smoke model, so the compiled steps are the same: the persistent
# compilation cache shared by the subprocesses makes every run after the first cheap.
_RUN = textwrap.dedent(
  """
  import json, sys
  import numpy as np
  from lsemil.runtime import sharding
  from lsemil.training import trainer
  from lsemil.core.configuration import load_config
  from lsemil.core.errors import NonFiniteLossError

  workdir, data_dir, num_steps, nan_at = sys.argv[1:5]
  config = load_config("smoke")
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
  except NonFiniteLossError as e:
    out = {"error": str(e)}
  print("RESULT " + json.dumps(out))
  """
)


@pytest.fixture
def run(script_result, lsemil):
  """fn(workdir, data_dir, num_steps, *, cache, nan_at=0) -> (result, output):
  `_RUN` in a subprocess."""

  def run(workdir, data_dir, num_steps, *, cache, nan_at=0):
    args = [workdir, data_dir, num_steps, nan_at]
    return script_result(_RUN, *args, env=lsemil.env(cache))

  return run


def test_cli_smoke_run_then_exact_resume_and_nan_stop(tmp_path, lsemil, run, jax_cache):
  """`lsemil train` on the smoke config with no data (it synthesizes W/data), 4 steps;
  then 2 steps + exit + 2 resumed steps elsewhere give bit-identical weights."""
  cache, a = jax_cache, tmp_path / "a"
  cmd = [sys.executable, "-m", "lsemil.commands.cli", "train", "--config", "configs/smoke.py"]
  cmd += ["--workdir", str(a), "--config.train.num_steps=4"]
  cmd += ["--config.train.eval_every_steps=2", "--config.train.checkpoint_every_steps=1"]
  env = lsemil.env(cache)
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
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
  half, _ = run(b, a / "data", 2, cache=cache)
  assert half["last_step"] == 2
  resumed, log = run(b, a / "data", 4, cache=cache)
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
  out, _ = run(tmp_path / "c", a / "data", 4, cache=cache, nan_at=1)
  assert "at step 3" in out["error"] and "step 2" in out["error"]
  assert sorted(p.name for p in (tmp_path / "c" / "checkpoints").iterdir()) == ["2"]
