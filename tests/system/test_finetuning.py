"""Fine-tuning through the CLI (`lsemil train --init-from`, lsemil.training.initialization): the
source is a smoke model trained 6 steps on the shared synthetic dataset. Fine-tuned from it, the
first validation loss is below a from-scratch run's with the same seed and data; with
`train.freeze=backbone` every backbone variable (BatchNorm statistics included) is bit-identical
to the source's after training, and a resumed fine-tuning run continues from its own
checkpoint."""

from __future__ import annotations

import json

import flax.traverse_util
import numpy as np
import pytest

from lsemil.runtime import checkpointing
from lsemil.training import initialization

ONE_STEP = ("--config.train.num_steps=1", "--config.train.eval_every_steps=1")


def _train(lsemil, workdir, data_dir, *args):
  """`lsemil train` of the smoke config; its output."""
  proc = lsemil("train", "--config", "configs/smoke.py", "--workdir", workdir, "--data-dir",
                data_dir, *args)  # fmt: skip
  return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory, synth_dir, lsemil):
  """W1: the smoke config trained 6 steps (evaluated at the last)."""
  w1 = tmp_path_factory.mktemp("finetune") / "w1"
  _train(lsemil, w1, synth_dir, "--config.train.eval_every_steps=6")
  return w1


def _first_val_loss(workdir) -> float:
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return next(r["val_loss"] for r in records if r["kind"] == "eval" and r["step"] == 1)


def test_finetuned_run_starts_below_a_from_scratch_run(tmp_path, lsemil, synth_dir, source):
  out = _train(lsemil, tmp_path / "tuned", synth_dir, "--init-from", source, *ONE_STEP)
  best = json.loads((source / "result.json").read_text())["best_step"]
  assert f"initialised from {source / 'checkpoints' / str(best)} (step {best}" in out
  assert "head: 14 of 14 classes copied" in out and "new classes (fresh rows): none" in out
  scratch = _train(lsemil, tmp_path / "scratch", synth_dir, *ONE_STEP)
  assert "training from scratch" in scratch
  tuned_loss, scratch_loss = (_first_val_loss(tmp_path / w) for w in ("tuned", "scratch"))
  assert tuned_loss < scratch_loss, (tuned_loss, scratch_loss)


def _flat(workdir, which: str) -> dict[tuple, np.ndarray]:
  _, _, variables, _, _ = checkpointing.load_inference(workdir, which=which)
  return flax.traverse_util.flatten_dict(variables)


def test_frozen_backbone_is_bit_identical_and_a_resumed_run_is_not_reinitialised(
  tmp_path, lsemil, synth_dir, source
):
  w = tmp_path / "frozen"
  freeze = "--config.train.freeze=backbone"
  first = _train(lsemil, w, synth_dir, "--init-from", source, freeze, *ONE_STEP)
  assert "initialised from" in first
  # Preempted after step 1 and run again with the same command (2 steps now): it continues.
  again = _train(lsemil, w, synth_dir, "--init-from", source, freeze,
                 "--config.train.num_steps=2", "--config.train.eval_every_steps=1")  # fmt: skip
  assert f"resuming from {w / 'checkpoints' / '1'} (step 1); train.init_from=" in again
  assert "initialised from" not in again
  tuned, start = _flat(w, "latest"), _flat(source, "best")
  assert tuned.keys() == start.keys()
  heads = [k for k in tuned if initialization.is_head(k)]
  assert {k[1] for k in heads} == {"head", "pool"}
  for key, value in tuned.items():
    if key not in heads:
      np.testing.assert_array_equal(value, start[key], err_msg="/".join(key))
  assert all(not np.array_equal(tuned[k], start[k]) for k in heads)  # the head trained
