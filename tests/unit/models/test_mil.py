"""Tests of lsemil.models.mil (Sec 3, Fig. 2) on tiny configs (its loss and optimizer:
test_objective.py).

The configs are the smoke config shrunk to 32-64 px inputs; compiles dominate the runtime, so
shapes are checked with `jax.eval_shape` and one model is compiled and shared per module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from lsemil.core import configuration, errors
from lsemil.models import mil, pooling
from lsemil.training import objective

# RngBitGenerator keys compile far faster than threefry on CPU; init values do not matter here.
KEY = jax.random.key(0, impl="unsafe_rbg")


K = 3


R0 = 2.5


def _cfg(**overrides):
  """The smoke model config shrunk to a 32 px input, 2 levels (16, 8 px), N = 16, K = 3."""
  cfg = configuration.load_config("smoke").model
  cfg.num_classes = K
  cfg.input_size = 32
  cfg.stem_stride = 2
  cfg.widths = (8, 16)
  cfg.blocks_per_level = (0, 1)
  cfg.saliency_size = 16
  cfg.r0 = R0
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0.0, 1.0, (n, size, size, 1)).astype(np.float32)


@functools.cache
def _base():
  """The base model, its variables and its eval outputs on a fixed batch of 4."""
  model = mil.from_config(_cfg())
  variables = mil.init_variables(model, KEY)
  x = _images(4)
  out = _base_eval(variables, x)
  return model, variables, x, out


@functools.cache
def _base_apply(train: bool):
  """The base model's jitted apply (compiled once per batch shape); train=True returns state."""
  model = mil.from_config(_cfg())
  mutable = ["batch_stats"] if train else False
  return jax.jit(functools.partial(model.apply, train=train, mutable=mutable))


def _base_eval(variables, x):
  return _base_apply(False)(variables, x)


def _in_unit(a) -> bool:
  a = np.asarray(a)
  return bool(np.all(np.isfinite(a)) and np.all(a >= 0) and np.all(a <= 1))


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
  "overrides",
  [
    dict(saliency_size=8),  # 32 px, stride 2: levels 16, 8
    dict(saliency_size=16),
    dict(input_size=64, widths=(8, 16, 32), blocks_per_level=(0, 0, 0), saliency_size=32),
    dict(stem_stride=1, widths=(8, 16, 32), blocks_per_level=(0, 0, 0), saliency_size=32),
    dict(
      input_size=64, stem_stride=1, widths=(8, 16, 32), blocks_per_level=(0, 0, 0), saliency_size=64
    ),
  ],
  ids=["N8", "N16", "N32", "N=input32", "N=input64"],
)
def test_output_shapes_for_each_n(overrides):
  cfg = _cfg(**overrides)
  model = mil.from_config(cfg)
  size, n = cfg.input_size, cfg.saliency_size
  x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), KEY, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert out["probs"].shape == (2, K)
  assert out["saliency"].shape == (2, n, n, K)
  # Coarse to fine: the coarsest level, doubling, ending at N (== saliency).
  level_sides = [size // cfg.stem_stride // 2**level for level in range(len(cfg.widths))]
  sides = [s.shape[1] for s in out["saliency_levels"]]
  assert sides[0] == min(level_sides)
  assert sides[-1] == n
  assert all(b == 2 * a for a, b in zip(sides, sides[1:], strict=False))
  assert len(sides) == sum(side <= n for side in level_sides)
  for s in out["saliency_levels"]:
    assert s.shape == (2, s.shape[1], s.shape[1], K) and s.dtype == jnp.float32
  spec = mil.validate(cfg)
  assert spec.level_sides == tuple(level_sides)
  assert [spec.level_sides[level] for level in spec.fused_levels] == sides[::-1]


def test_forward_values_in_unit_interval_and_levels_end_at_saliency():
  _, _, _, out = _base()
  assert _in_unit(out["probs"]) and _in_unit(out["saliency"])
  assert all(_in_unit(s) for s in out["saliency_levels"])
  assert [s.shape[1] for s in out["saliency_levels"]] == [8, 16]
  np.testing.assert_array_equal(out["saliency_levels"][-1], out["saliency"])
  # Different images give different maps (the saliency is not a constant).
  assert float(jnp.std(out["saliency"])) > 0


def test_probs_equal_lse_lba_of_returned_saliency_and_pool_beta():
  _, variables, x, _ = _base()
  beta = jnp.array([0.3, -1.2, 2.0])
  params = dict(variables["params"])
  assert params["pool"]["beta"].shape == (K,)
  params["pool"] = {"beta": beta}
  out = _base_eval({**variables, "params": params}, x)
  want = pooling.lse_lba(out["saliency"], beta, R0)
  np.testing.assert_allclose(out["probs"], want, rtol=1e-6, atol=1e-7)
  # beta does enter: with the init beta (0) the probs differ.
  zero_beta = pooling.lse_lba(out["saliency"], jnp.zeros(K), R0)
  assert float(jnp.max(jnp.abs(out["probs"] - zero_beta))) > 1e-4


def test_scalar_beta_config():
  model = mil.from_config(_cfg(per_class_beta=False, beta_init=-0.5))
  variables = jax.eval_shape(
    functools.partial(model.init, train=False),
    KEY,
    jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32),
  )
  assert variables["params"]["pool"]["beta"].shape == ()


# ------------------------------------------------------------------------------ training


def _learnable_batch():
  """8 images with 3 findings: a bright square, a horizontal bar, a square in the left half."""
  rng = np.random.default_rng(1)
  x = rng.uniform(0.0, 0.2, (8, 32, 32, 1)).astype(np.float32)
  y = np.zeros((8, K), np.float32)
  for i in range(8):
    if i % 2:
      r, c = rng.integers(2, 24, 2)
      x[i, r : r + 6, c : c + 6] = 1.0
      y[i, 0] = 1.0
      y[i, 2] = float(c + 3 < 16)
    if (i // 2) % 2:
      r = rng.integers(2, 30)
      x[i, r : r + 2, 4:28] = 0.7
      y[i, 1] = 1.0
  return x, y


@functools.cache
def _trained(steps: int = 30):
  """Adam (paper_optimizer, lr 1e-3, wd 1e-5) on the learnable batch; BatchNorm in train mode."""
  model, variables, _, _ = _base()
  tx = objective.paper_optimizer()
  x, y = _learnable_batch()

  def loss_fn(params, batch_stats):
    out, state = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return objective.binary_cross_entropy(out["probs"], y), state["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  loss_history, first_grads = [], None
  for _ in range(steps + 1):  # the last call only evaluates the loss after `steps` updates
    new = step(params, batch_stats, opt_state)
    loss_history.append(float(new[3]))
    first_grads = new[4] if first_grads is None else first_grads
    params, batch_stats, opt_state = new[:3]
  return loss_history, first_grads


def test_jit_grad_is_finite_for_every_param_including_beta():
  _, variables, _, _ = _base()
  _, grads = _trained()
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert g.dtype == jnp.float32
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
  assert grads["pool"]["beta"].shape == (K,)
  assert np.all(np.asarray(grads["pool"]["beta"]) != 0)
  assert float(jnp.max(jnp.abs(grads["head"]["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(grads["stem"]["kernel"]))) > 0


def test_adam_steps_lower_the_loss():
  history, _ = _trained()
  assert all(np.isfinite(history))
  assert history[-1] < 0.8 * history[0], history


# ------------------------------------------------------------------------------ dtypes and norms


def test_bfloat16_path_float32_params_and_close_to_float32():
  base_model, variables, x, out32 = _base()
  model = mil.from_config(_cfg(dtype="bfloat16"))
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), KEY, jax.ShapeDtypeStruct(x.shape, jnp.float32)
  )
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes["params"]))
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  out16 = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert out16["probs"].dtype == jnp.float32 and out16["saliency"].dtype == jnp.float32
  assert _in_unit(out16["probs"]) and _in_unit(out16["saliency"])
  np.testing.assert_allclose(out16["probs"], out32["probs"], atol=0.03)
  np.testing.assert_allclose(out16["saliency"], out32["saliency"], atol=0.06)
  # ... and it is a different computation, not silently float32.
  assert float(jnp.max(jnp.abs(out16["saliency"] - out32["saliency"]))) > 0
  del base_model


def test_group_norm_at_n_equal_to_input_size():
  # GroupNorm: no batch_stats collection, no train/eval difference. The same model runs
  # Sec 3.6's "typical choice" N = w = h (stem stride 1, N = 32 = input size).
  model = mil.from_config(_cfg(norm="group", group_norm_groups=4, stem_stride=1, saliency_size=32))
  variables = mil.init_variables(model, KEY)
  assert set(variables) == {"params"}
  x = _images(2, seed=3)
  apply = jax.jit(model.apply, static_argnames="train")
  train_out = apply(variables, x, train=True)  # no mutable collection needed
  eval_out = apply(variables, x, train=False)
  assert eval_out["saliency"].shape == (2, 32, 32, K)
  assert [s.shape[1] for s in eval_out["saliency_levels"]] == [16, 32]
  assert _in_unit(eval_out["probs"]) and _in_unit(eval_out["saliency"])
  np.testing.assert_allclose(train_out["probs"], eval_out["probs"], rtol=1e-6)
  np.testing.assert_allclose(train_out["saliency"], eval_out["saliency"], rtol=1e-6)


def test_batch_norm_train_updates_batch_stats_and_eval_uses_running_averages():
  _, variables, x, out_eval = _base()
  apply_train = _base_apply(True)
  out_train, state = apply_train(variables, x)
  old, new = variables["batch_stats"], state["batch_stats"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
    assert not np.allclose(a, b)
  # momentum 0.9 on the stem norm: mean' = 0.9 * 0 + 0.1 * batch mean of the stem conv.
  stem = nn.Conv(8, (7, 7), strides=2, use_bias=False).apply(
    {"params": variables["params"]["stem"]}, x
  )
  np.testing.assert_allclose(
    new["stem_norm"]["mean"], 0.1 * np.asarray(stem).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7
  )
  # train=True normalizes with the batch's statistics: an image's output depends on the batch.
  # Same first two images, two other companions.
  x_alt = np.concatenate([x[:2], _images(2, seed=9)])
  out_train_alt, _ = apply_train(variables, x_alt)
  assert not np.allclose(out_train_alt["probs"][:2], out_train["probs"][:2], atol=1e-5)
  # train=False uses the stored running averages: per-image, independent of the batch ...
  eval_alt = _base_eval(variables, x_alt)
  np.testing.assert_allclose(eval_alt["probs"][:2], out_eval["probs"][:2], rtol=1e-5, atol=1e-7)
  # ... and it reads them: the updated averages change the output.
  updated = _base_eval({**variables, "batch_stats": new}, x)
  assert not np.allclose(updated["probs"], out_eval["probs"], atol=1e-5)


# ------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("factor", [2, 4])
def test_upsample_nearest_maps_each_pixel_to_a_block(factor):
  x = np.random.default_rng(4).normal(size=(2, 3, 5, 4)).astype(np.float32)
  up = np.asarray(mil.upsample_nearest(jnp.asarray(x), factor))
  assert up.shape == (2, 3 * factor, 5 * factor, 4)
  for i in range(3):
    for j in range(5):
      block = up[:, i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
      np.testing.assert_array_equal(block, np.broadcast_to(x[:, i : i + 1, j : j + 1], block.shape))
  assert mil.upsample_nearest(jnp.zeros((3, 3, 2), jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("name", [p for p in pooling.POOLINGS if p != "lse_lba"])
def test_alternative_pooling_builds_and_gives_probs_in_unit_interval(name):
  _, variables, x, base_out = _base()
  model = mil.from_config(_cfg(pooling=name))
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False), KEY, jax.ShapeDtypeStruct(x.shape, jnp.float32)
  )
  assert "pool" not in shapes["params"]  # parameter-free pooling
  params = {k: v for k, v in variables["params"].items() if k != "pool"}
  out = model.apply({**variables, "params": params}, x, train=False)
  assert out["probs"].shape == (4, K) and _in_unit(out["probs"])
  np.testing.assert_allclose(out["saliency"], base_out["saliency"], rtol=1e-6, atol=1e-7)
  want = pooling.FixedPool(name, r=R0).apply({}, out["saliency"])
  np.testing.assert_allclose(out["probs"], want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ invalid configs

INVALID = [
  (dict(input_size=64, saliency_size=64), "saliency_size"),  # stride 2: largest level is 32
  (dict(saliency_size=64), "saliency_size"),  # N > input size
  (dict(saliency_size=12), "saliency_size"),  # not a power of two
  (dict(input_size=48), "input_size"),
  (dict(pooling="median"), "pooling"),
  (dict(norm="layer"), "norm"),
  (dict(dtype="float16"), "dtype"),
  (dict(blocks_per_level=(0, 0, 0)), "blocks_per_level"),
  (dict(stem_stride=3), "stem_stride"),
  (dict(r0=-1.0), "r0"),
  (dict(norm="group", group_norm_groups=3), "group_norm_groups"),
  (dict(num_classes=0), "num_classes"),
  (dict(widths=(8, 0)), "widths"),
  (dict(bottleneck_ratio=0), "bottleneck_ratio"),
  (dict(up_convs=0), "up_convs"),  # two fused levels share the head: both need up_features
  (dict(dense_growth=0), "dense_growth"),
  (dict(batch_norm_impl="cudnn"), "batch_norm_impl"),
  (dict(conv1x1_impl="fft"), "conv1x1_impl"),
  (dict(conv_weight_grad="winograd"), "conv_weight_grad"),
  (dict(stem_impl="patchify"), "stem_impl"),
]


class _CompileEvents:
  """Collects jax's trace/lower/compile monitoring events while active."""

  def __init__(self):
    self.events = []

  def _record(self, name, *args, **kwargs):
    if name.startswith("/jax/core/compile"):
      self.events.append(name)

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._record)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._record)


def test_compile_event_probe_sees_compiles():
  # The probe used below can fail: a fresh jit does register compile events.
  with _CompileEvents() as probe:
    jax.jit(lambda v: v * 3.0 + 1.0)(jnp.ones(3)).block_until_ready()
  assert probe.events


@pytest.mark.parametrize("overrides, field", INVALID, ids=[f for _, f in INVALID])
def test_invalid_config_raises_naming_the_field_before_any_compile(overrides, field):
  cfg = _cfg(**overrides)
  with _CompileEvents() as probe:
    with pytest.raises(ValueError, match=f"model config: {field}:"):
      mil.validate(cfg)
    with pytest.raises(ValueError, match=f"model config: {field}:"):
      mil.from_config(cfg)  # validates eagerly: no init, no trace
  assert probe.events == []


def test_invalid_config_raises_config_error():
  with pytest.raises(errors.ConfigError, match="model config: up_convs:"):
    mil.validate(_cfg(up_convs=0))


def test_paper_config_with_group_norm_is_rejected_naming_the_bottleneck_width():
  # 16 groups cannot split the 8-channel bottleneck of level 0 (32 // 4): flax would fail late.
  cfg = configuration.load_config("paper").model
  cfg.norm = "group"
  with pytest.raises(
    errors.ConfigError, match=r"group_norm_groups:.*widths\[0\] // bottleneck_ratio = 8"
  ):
    mil.validate(cfg)
  with pytest.raises(ValueError, match="group_norm_groups"):
    mil.from_config(cfg)  # ConfigError is a ValueError


def test_paper_config_with_group_norm_that_divides_every_width_builds():
  cfg = configuration.load_config("paper").model
  cfg.norm, cfg.group_norm_groups = "group", 8
  model = mil.from_config(cfg)
  variables = jax.eval_shape(lambda: mil.init_variables(model, KEY))
  assert "batch_stats" not in variables
  assert mil.param_count(variables["params"]) > 5_000_000


def test_speed_options_keep_the_parameter_tree_and_the_outputs():
  _, variables, x, out = _base()
  for overrides in (
    dict(batch_norm_impl="flax", conv1x1_impl="conv"),
    dict(conv_weight_grad="gemm", stem_impl="space_to_depth"),
    dict(stem_impl="pad8"),
    dict(dense_impl="split", up_impl="split"),
    dict(dense_impl="buffer", remat=True, remat_policy="dots"),
  ):
    model = mil.from_config(_cfg(**overrides))
    shapes = jax.eval_shape(lambda m=model: mil.init_variables(m, KEY))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
    assert [a.shape for a in jax.tree.leaves(shapes)] == [
      a.shape for a in jax.tree.leaves(variables)
    ]
    got = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    np.testing.assert_allclose(got["probs"], out["probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["saliency"], out["saliency"], rtol=1e-5, atol=1e-5)


def test_concat_levers_resolve_per_target_platform():
  assert [mil.resolve_concat_impl("auto", p) for p in ("cpu", "gpu", "tpu")] == [
    "concat", "concat", "split"]  # fmt: skip
  assert mil.resolve_concat_impl("buffer", "cpu") == "buffer"


def test_unknown_field_in_from_config_raises_naming_it():
  cfg = _cfg()
  cfg.saliency_sise = 16
  with _CompileEvents() as probe:
    with pytest.raises(ValueError, match="unknown fields.*saliency_sise"):
      mil.from_config(cfg)
    with pytest.raises(ValueError, match="unknown fields.*bogus"):
      mil.from_config({**_cfg().to_dict(), "bogus": 1})
  assert probe.events == []


def test_from_config_accepts_a_mapping_and_lists():
  values = _cfg().to_dict()
  values["widths"] = [8, 16]
  model = mil.from_config(values)
  assert model.widths == (8, 16) and model.saliency_size == 16


def test_uint8_input_equals_float_input_scaled_to_unit_interval():
  # The input pipeline sends uint8 images; the model scales them to [0, 1] on the device.
  _, variables, _, _ = _base()
  x8 = (np.random.default_rng(3).uniform(0, 256, (4, 32, 32, 1))).astype(np.uint8)
  out8 = _base_eval(variables, x8)
  outf = _base_eval(variables, x8.astype(np.float32) / 255.0)
  np.testing.assert_allclose(out8["probs"], outf["probs"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out8["saliency"], outf["saliency"], rtol=1e-5, atol=1e-6)
  # Without the scaling, 0..255 inputs would give a different model output.
  outraw = _base_eval(variables, x8.astype(np.float32))
  assert not np.allclose(outraw["probs"], outf["probs"], atol=1e-3)
