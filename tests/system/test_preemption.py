"""Preemption and Ctrl-C: a real `lsemil train` process gets SIGTERM / SIGINT after its first
checkpoint, saves the step it is at, exits 75 naming it; the rerun ends with the same params
as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lsemil.core.errors import EXIT_PREEMPTED
from lsemil.inference import engine

REPO = Path(__file__).resolve().parents[2]
STEPS = 12


def train_cmd(workdir: Path, data: Path) -> list[str]:
  return [
    sys.executable, "-m", "lsemil.commands.cli", "train", "--config", "configs/smoke.py",
    "--workdir", str(workdir), "--data-dir", str(data),
    f"--config.train.num_steps={STEPS}", "--config.train.eval_every_steps=6",
    "--config.train.checkpoint_every_steps=2", "--config.train.keep_checkpoints=20",
  ]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
  from lsemil.data import phantoms

  return phantoms.synthesize(tmp_path_factory.mktemp("pre") / "d", patients=40, size=512, seed=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, jax_cache, lsemil) -> Path:
  w = tmp_path_factory.mktemp("ref") / "w"
  proc = subprocess.run(train_cmd(w, data), cwd=REPO, env=lsemil.env(jax_cache),
                        capture_output=True, text=True)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  return w


def params_at(workdir: Path, step: int) -> list[np.ndarray]:
  import jax

  loaded = engine.load(workdir / "checkpoints" / str(step))
  return [np.asarray(x) for x in jax.tree.leaves(loaded.variables)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_rerun_resumes_exactly(tmp_path, data, reference, sig, jax_cache, lsemil):
  w, env = tmp_path / "w", lsemil.env(jax_cache)
  proc = subprocess.Popen(
    train_cmd(w, data), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 600
  while not (w / "checkpoints" / "2").is_dir():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, "no first checkpoint"
    time.sleep(0.05)
  os.kill(proc.pid, sig)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
  assert f"stopped by {signal.Signals(sig).name} after saving step" in err
  assert "Traceback" not in err
  stopped = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert stopped and stopped[-1] < STEPS  # it stopped early, having saved where it was

  rerun = subprocess.run(train_cmd(w, data), cwd=REPO, env=env, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"(step {stopped[-1]})" in rerun.stderr + rerun.stdout  # resumed from that step
  for a, b in zip(params_at(w, STEPS), params_at(reference, STEPS), strict=True):
    np.testing.assert_array_equal(a, b)
  lines = (w / "metrics.jsonl").read_text().splitlines()
  keys = [(line.split('"step": ')[1].split(",")[0], '"kind": "eval"' in line) for line in lines]
  assert len(keys) == len(set(keys)), "a step was logged twice"
