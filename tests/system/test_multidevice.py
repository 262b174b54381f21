"""Mesh and shardings (lsemil.runtime.sharding) on several devices: one train step (paper Sec 4.2)
gives the same loss and parameters on 1 and 8 devices, replicated or FSDP-sharded, and in bf16
keeps float32 parameters and optimizer state.

The check runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 so it
does not depend on how (or whether) the test session's JAX was initialised.
"""

from __future__ import annotations

import os
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
  """
  import json
  import jax, jax.numpy as jnp, numpy as np
  from lsemil.models import mil
  from lsemil.runtime import sharding
  from lsemil.training import trainer
  from lsemil.core.configuration import load_config

  assert jax.device_count() == 8, jax.devices()
  config = load_config("smoke")
  rng = np.random.default_rng(0)
  s = config.model.input_size
  batch = {
    "image": rng.uniform(size=(8, s, s, 1)).astype(np.float32),
    "labels": (rng.uniform(size=(8, 14)) < 0.3).astype(np.float32),
  }

  init = None  # created once (one init compile), then placed into each sharding

  def one_step(devices, fsdp, dtype="float32"):
    global init
    config.model.dtype, config.train.fsdp, config.train.fsdp_min_size = dtype, fsdp, 256
    model = mil.from_config(config.model)
    tx = trainer.create_optimizer(config)
    mesh = sharding.create_mesh(devices)
    _, state_sh = trainer.state_sharding_for(config, model, tx, mesh)
    if init is None:
      init = jax.device_get(trainer.init_state(config, model, tx, mesh, state_sh))
    state = jax.device_put(init, state_sh)
    split = [
      str(sh.spec) for sh in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state))
      if sh.spec != jax.P()
    ]
    step = trainer.make_train_step(model, tx, mesh, state_sh)
    with jax.set_mesh(mesh):
      gb = sharding.global_batch(batch, sharding.batch_sharding(mesh))
      assert len(gb["image"].sharding.device_set) == len(devices)
      new, metrics = step(state, gb)
    host = jax.tree.map(np.asarray, jax.device_get(new))
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves((host.params, host.opt_state))})
    return host, float(metrics["loss"]), split, dtypes

  ref, ref_loss, _, _ = one_step(jax.devices()[:1], False)
  out = {"loss_1": ref_loss}
  for name, fsdp in (("dp8", False), ("fsdp8", True)):
    state, loss, split, _ = one_step(jax.devices(), fsdp)
    diffs = [
      float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
      for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state), strict=True)
    ]
    out[name] = {"loss": loss, "max_diff": max(diffs), "split_leaves": len(split)}
  bf16, loss, _, dtypes = one_step(jax.devices(), False, "bfloat16")
  out["bf16"] = {"loss": loss, "dtypes": dtypes, "finite": bool(
    all(np.all(np.isfinite(x)) for x in jax.tree.leaves(bf16.params)))}
  print("RESULT " + json.dumps(out))
  """
)


def test_one_step_same_on_1_and_8_devices_fsdp_and_bf16(script_result):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    # Cheaper CPU compiles (flax's tests do the same); both sides of each comparison share it.
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
  )
  out, _ = script_result(_SCRIPT, env=env)
  for name in ("dp8", "fsdp8"):
    assert out[name]["loss"] == pytest.approx(out["loss_1"], rel=1e-5, abs=1e-5), out
    assert out[name]["max_diff"] < 1e-5, out
  assert out["dp8"]["split_leaves"] == 0
  assert out["fsdp8"]["split_leaves"] > 0  # FSDP really split some params and Adam moments
  # Mixed precision: bf16 compute, float32 params and optimizer state, a close loss.
  assert out["bf16"]["dtypes"] == ["float32", "int32"], out
  assert out["bf16"]["finite"]
  assert out["bf16"]["loss"] == pytest.approx(out["loss_1"], rel=0.05), out
