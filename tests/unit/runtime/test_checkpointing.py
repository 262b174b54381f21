"""Checkpoints (lsemil.runtime.checkpointing) and exact resume of training (paper Sec 4.2).

Tests build states from the smoke model's shapes without compiling it. Exact resume in real
processes is tests/system/test_resume.py.
"""

from __future__ import annotations

import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsemil.core.configuration import load_config
from lsemil.models import mil
from lsemil.runtime import checkpointing
from lsemil.training import trainer


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


@pytest.mark.parametrize("late", ["after shutdown", "after interpreter shutdown"])
def test_metadata_thread_after_a_reported_save_failure_logs_nothing(monkeypatch, late):
  """After a failed save (one OutputError), orbax's metadata thread may still schedule work
  on the closed manager's executor or during the exit: either message is dropped, with or
  without its traceback, and only then (a loaded host's full-disk run printed the first)."""
  exc = RuntimeError(f"cannot schedule new futures {late}")
  with_tb = logging.LogRecord("absl", 40, "f", 1, "run() raised", None, (RuntimeError, exc, None))
  text = logging.LogRecord("absl", 40, "f", 1, f"run() raised: {exc}", None, None)
  for failed in (False, True):
    monkeypatch.setattr(checkpointing, "_save_failed", failed)
    assert checkpointing._not_reported_save_failure(with_tb) is not failed
    assert checkpointing._not_reported_save_failure(text) is not failed
