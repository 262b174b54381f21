"""The train step, validation hooks and the `lsemil train` command line (paper Sec 4.2).

End-to-end runs (CLI smoke run, exact resume, NaN stop) are in test_checkpointing.py and the
1-vs-8-device equivalence in test_sharding.py; these tests stay in-process and small.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsemil import main as main_lib
from lsemil import model as model_lib
from lsemil import sharding, train
from lsemil.config_lib import load_config


@pytest.fixture
def fast_compiles():
  """Cheaper XLA CPU compiles for this test only (flax's example tests do the same)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def test_train_step_eval_step_and_predict(fast_compiles):
  config = load_config("smoke")
  model = model_lib.from_config(config.model)
  tx = train.create_optimizer(config)
  mesh = sharding.create_mesh(jax.devices()[:1])
  _, state_sh = train.state_sharding_for(config, model, tx, mesh)
  state = train.init_state(config, model, tx, mesh, state_sh)
  stats0 = jax.device_get(state.batch_stats)
  rng = np.random.default_rng(0)
  s = config.model.input_size
  batch = {
    "image": rng.uniform(size=(8, s, s, 1)).astype(np.float32),
    "labels": (rng.uniform(size=(8, 14)) < 0.3).astype(np.float32),
  }
  step_fn = train.make_train_step(model, tx, mesh, state_sh)
  losses = []
  with jax.set_mesh(mesh):
    gb = sharding.global_batch(batch, sharding.batch_sharding(mesh))
    for _ in range(4):
      state, metrics = step_fn(state, gb)
      losses.append(float(metrics["loss"]))
  assert int(state.step) == 4
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # Adam fits a fixed batch
  assert set(metrics) == {"loss", "grad_norm", "param_norm", "r"}
  beta = np.asarray(state.params["pool"]["beta"])
  assert float(metrics["r"]) == pytest.approx(np.mean(config.model.r0 + np.exp(beta)), rel=1e-6)
  moved = jax.tree.map(
    lambda a, b: not np.allclose(a, b), stats0, jax.device_get(state.batch_stats)
  )
  assert any(jax.tree.leaves(moved))  # BatchNorm running statistics were updated
  # Float32 params and Adam moments (the model's compute dtype only affects activations).
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
    jnp.dtype("float32"),
    jnp.dtype("int32"),
  }

  eval_fn = train.make_eval_step(model, mesh, state_sh)
  mask = np.array([True] * 6 + [False] * 2)
  with jax.set_mesh(mesh):
    out = eval_fn(
      state, sharding.global_batch({**batch, "mask": mask}, sharding.batch_sharding(mesh))
    )
  probs = np.asarray(out["probs"])
  assert probs.shape == (8, 14) and np.all((probs >= 0) & (probs <= 1))
  np.testing.assert_array_equal(np.asarray(out["mask"]), mask)

  variables = {
    "params": jax.device_get(state.params),
    "batch_stats": jax.device_get(state.batch_stats),
  }
  pred = train.make_predict_fn(model)(variables, batch["image"][:2])
  n = config.model.saliency_size
  assert pred["saliency"].shape == (2, n, n, 14)
  np.testing.assert_allclose(np.asarray(pred["probs"]), probs[:2], rtol=1e-5, atol=1e-6)
  assert pred["saliency_levels"][-1].shape == (2, n, n, 14)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("model.saliency_size", 12, "saliency_size"),
    ("train.learning_rate", float("nan"), "learning_rate"),
    ("train.batch_size", 0, "batch_size"),
    ("train.num_steps", -1, "num_steps"),
  ],
)
def test_config_errors_raise_before_anything_runs(tmp_path, field, value, match):
  config = load_config("smoke")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, tmp_path / "w", data_dir=tmp_path)
  assert not (tmp_path / "w").exists()  # nothing written, nothing compiled


def test_missing_dataset_is_a_clear_error_except_for_smoke(tmp_path):
  config = load_config("demo")
  with pytest.raises(ValueError, match="--data-dir"):
    train.train_and_evaluate(config, tmp_path / "w")


def test_flags_overrides_and_sibling_config_imports():
  fv = main_lib.parse_flags(
    [
      "--config",
      "configs/smoke.py:r0=10",
      "--workdir",
      "/tmp/w",
      "--data-dir",
      "/tmp/d",
      "--config.train.batch_size=16",
      "--config.model.dtype=bfloat16",
    ]
  )
  assert fv.config.model.r0 == 10.0  # paper.py's argument, through demo.py and smoke.py
  assert fv.config.train.batch_size == 16 and fv.config.model.dtype == "bfloat16"
  assert fv.config.model.input_size == 64  # smoke's own value
  assert fv.workdir == "/tmp/w" and fv.data_dir == "/tmp/d"
  paper = main_lib.parse_flags(["--config=configs/paper.py:r0=0", "--workdir=/tmp/w"])
  assert paper.config.model.r0 == 0.0 and paper.config.train.init_from == ""


def test_cli_help_and_usage_errors(capsys):
  assert main_lib.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert "lsemil train --config" in out and "--workdir" in out and "--config.train" in out
  assert main_lib.main(["--config", "configs/smoke.py"]) == 2
  assert "--workdir" in capsys.readouterr().err
  assert main_lib.main(["--config", "configs/smoke.py", "--workdir", "w", "--config.x.y=1"]) == 2
  assert main_lib.main(["--config", "configs/nothere.py", "--workdir", "w"]) == 2


def test_early_stopping_counts_evaluations_without_improvement():
  meta = {"best_step": None, "best_val_mean_auc": None, "evals_since_best": 0}
  history = [(1, None), (2, 0.6), (3, 0.7), (4, 0.65), (5, 0.7), (6, 0.69)]
  stopped = []
  for step, auc in history:
    meta.update(train.early_stopping_update(meta, step, auc, patience=3))
    stopped.append(meta["stopped_early"])
  assert meta["best_step"] == 3 and meta["best_val_mean_auc"] == 0.7  # ties do not improve
  assert stopped == [False, False, False, False, False, True]
  last = train.early_stopping_update(meta, 7, 0.1, patience=3, last_step=True)
  assert last["stopped_early"] is False  # the run ends anyway
  assert not train.early_stopping_update(meta, 7, 0.1, patience=0)["stopped_early"]


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  from lsemil import tb_writer

  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 2.0}\n')
  w = tb_writer.MetricWriter(tmp_path)
  w.write(
    2, {"loss": np.float32(1.5), "aucs": [0.5, float("nan")], "auc": float("nan")}, kind="train"
  )
  w.flush()
  w.close()
  w.close()  # idempotent
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines[0]["step"] == 1  # appended, not overwritten (resume)
  assert lines[1] == {"step": 2, "kind": "train", "loss": 1.5, "aucs": [0.5, None], "auc": None}
  events = list((tmp_path / "tb").glob("events.out.tfevents*"))
  assert events and events[0].stat().st_size > 0
  tb_writer.MetricWriter(tmp_path / "off", enabled=False).write(1, {"x": 1}, kind="train")
  assert not (tmp_path / "off").exists()  # only process 0 writes
