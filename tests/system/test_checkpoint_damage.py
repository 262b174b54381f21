"""Damaged checkpoints and reading during training, through real files and the CLI.

- the newest step of a workdir damaged (a truncated or missing data file, a zero-byte
  manifest, garbage JSON, a config that does not match the stored shapes): `predict` and
  `evaluate --which latest` and `train`'s resume fall back to the newest intact step with a
  warning naming the skipped step; the damaged step asked for by path, or every step
  damaged, is one CheckpointError line naming the step and the file; nothing is deleted;
- readers in threads (in-process `load_inference`, as ten `lsemil predict` processes are too
  slow on two cores) while a training with keep_checkpoints=1 replaces its only step: 0
  failures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lsemil.runtime import checkpointing

KINDS = ["truncated", "missing", "manifest", "metadata", "shapes"]


def damage(step_dir: Path, kind: str) -> None:
  model = step_dir / "model"
  data = sorted((model / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
  if kind == "truncated":
    data[-1].write_bytes(data[-1].read_bytes()[: data[-1].stat().st_size // 2])
  elif kind == "missing":
    data[-1].unlink()
  elif kind == "manifest":
    (model / "manifest.ocdbt").write_bytes(b"")
  elif kind == "metadata":
    (step_dir / "config" / "metadata").write_text("{not json")
  elif kind == "shapes":
    path = step_dir / "config" / "metadata"
    config = json.loads(path.read_text())
    config["model"]["stem_features"] = 12
    path.write_text(json.dumps(config))


def _train_args(workdir, data_dir, *extra):
  return ["train", "--config", "configs/smoke.py", "--workdir", workdir, "--data-dir", data_dir,
          "--config.train.checkpoint_every_steps=1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dir, jax_cache, lsemil) -> Path:
  """A smoke workdir with checkpoints at steps 1..6 (6 the newest)."""
  w = tmp_path_factory.mktemp("trained") / "W"
  lsemil(*_train_args(w, synth_dir, "--config.train.keep_checkpoints=20"), cache=jax_cache)
  assert sorted(int(p.name) for p in (w / "checkpoints").iterdir()) == [1, 2, 3, 4, 5, 6]
  return w


def _copy(trained: Path, tmp_path: Path) -> Path:
  w = tmp_path / "W"
  shutil.copytree(trained, w)
  return w


@pytest.mark.parametrize("kind", KINDS)
def test_predict_latest_skips_a_damaged_newest_step(
  tmp_path, trained, synth_dir, kind, jax_cache, lsemil
):
  w = _copy(trained, tmp_path)
  damage(w / "checkpoints" / "6", kind)
  files = sorted(p.relative_to(w) for p in w.rglob("*"))
  image = next((synth_dir / "images").glob("*.png"))
  proc = lsemil("predict", "--checkpoint", w, "--which", "latest", image, cwd=tmp_path,
                cache=jax_cache)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "skipped damaged checkpoint step 6" in proc.stderr, proc.stderr[-3000:]
  assert f"{w}/checkpoints/5" in proc.stdout + proc.stderr
  # The damaged step asked for by path: one line naming the step and the file.
  line = lsemil.one_error(
    lsemil.run("predict", "--checkpoint", w / "checkpoints" / "6", image, cwd=tmp_path,
               cache=jax_cache),
    "predict",
  )
  assert "checkpoint step 6" in line and f"{w}/checkpoints/6/" in line, line
  assert sorted(p.relative_to(w) for p in w.rglob("*")) == files  # nothing deleted


def test_every_step_damaged_is_one_error(tmp_path, trained, synth_dir, jax_cache, lsemil):
  w = _copy(trained, tmp_path)
  for step in range(1, 7):
    damage(w / "checkpoints" / str(step), "truncated")
  image = next((synth_dir / "images").glob("*.png"))
  line = lsemil.one_error(
    lsemil.run("predict", "--checkpoint", w, "--which", "latest", image, cwd=tmp_path,
               cache=jax_cache),
    "predict",
  )
  assert "no intact checkpoint" in line and f"{w}/checkpoints/6/model" in line, line


def test_evaluate_latest_skips_a_damaged_newest_step(
  tmp_path, trained, synth_dir, jax_cache, lsemil
):
  w = _copy(trained, tmp_path)
  damage(w / "checkpoints" / "6", "metadata")
  proc = lsemil("evaluate", "--checkpoint", w, "--which", "latest", "--data-dir", synth_dir,
                "--out", tmp_path / "ev", "--n-boot", "2", "--no-protocols", "--no-progress",
                cache=jax_cache)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "skipped damaged checkpoint step 6" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["truncated", "manifest"])  # resume reads no step config
def test_train_resumes_from_the_newest_intact_step(
  tmp_path, trained, synth_dir, kind, jax_cache, lsemil
):
  w = _copy(trained, tmp_path)
  damage(w / "checkpoints" / "6", kind)
  proc = lsemil(*_train_args(w, synth_dir, "--config.train.keep_checkpoints=20"),
                cache=jax_cache)
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out, out[-3000:]
  assert "cannot resume from checkpoint step 6" in out and "(step 5)" in out, out[-3000:]
  kept = [p for p in (w / "checkpoints").iterdir() if p.name.startswith("6.damaged")]
  assert len(kept) == 1, out[-3000:]  # moved aside, not deleted
  assert checkpointing.load_inference(w, which="latest")[3] == 6  # step 6 trained and saved again


def test_readers_during_training_with_keep_one_never_fail(tmp_path, synth_dir, lsemil):
  w = tmp_path / "W"
  trainer = lsemil.popen(
    *_train_args(w, synth_dir, "--config.train.keep_checkpoints=1",
                 "--config.train.num_steps=400", "--config.train.eval_every_steps=1000"),
    stdout=subprocess.DEVNULL, stderr=(tmp_path / "train.log").open("w"),
  )
  try:
    deadline = time.monotonic() + 120
    while not (w / "checkpoints").is_dir() or not any(
      p.name.isdigit() for p in (w / "checkpoints").iterdir()
    ):
      log = (tmp_path / "train.log").read_text
      assert trainer.poll() is None and time.monotonic() < deadline, log()
      time.sleep(0.05)
    failures, steps = [], []

    def read():
      for _ in range(3):
        try:
          steps.append(checkpointing.load_inference(w, which="latest")[3])
        except Exception as e:  # noqa: BLE001 - every failure counts
          failures.append(f"{type(e).__name__}: {e}")

    readers = [threading.Thread(target=read) for _ in range(10)]
    for t in readers:
      t.start()
    for t in readers:
      t.join()
    assert trainer.poll() is None, "the training ended before the readers did"
  finally:
    trainer.kill()
    trainer.wait()
  assert not failures, failures[:3]
  assert len(steps) == 30 and len(set(steps)) > 1, steps
