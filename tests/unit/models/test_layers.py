"""lsemil.models.layers against flax: BatchNorm (forward, gradients, running stats) and Conv."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lsemil.models import layers

F32_TOL = dict(rtol=2e-5, atol=2e-5)


def _x(shape, seed=0, offset=0.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape) * 2.0 + offset, jnp.float32)


def _bn_pair(dtype=jnp.float32, scale_init=nn.initializers.ones):
  kw = dict(momentum=0.9, epsilon=1e-5, dtype=dtype, scale_init=scale_init)
  return nn.BatchNorm(**kw), layers.BatchNorm(**kw)


def _perturbed(variables, seed=3):
  """Non-trivial scale, bias and running statistics (init gives ones / zeros)."""
  rng = np.random.default_rng(seed)
  p = variables["params"]
  stats = variables["batch_stats"]
  c = p["scale"].shape[0]
  return {
    "params": {
      "scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=c), jnp.float32),
    },
    "batch_stats": {
      "mean": jnp.asarray(rng.normal(size=c), jnp.float32) + stats["mean"],
      "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32),
    },
  }


def test_batch_norm_variables_match_flax_names_shapes_and_init():
  ref, new = _bn_pair(scale_init=nn.initializers.zeros)
  x = _x((2, 4, 4, 5))
  v_ref = ref.init(jax.random.key(0), x, use_running_average=False)
  v_new = new.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.structure(v_ref) == jax.tree.structure(v_new)
  for a, b in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_new), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert float(jnp.sum(jnp.abs(v_new["params"]["scale"]))) == 0.0  # the zero-init option


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_batch_norm_train_forward_grads_and_stats_equal_flax_float32(offset):
  ref, new = _bn_pair()
  x = _x((3, 6, 5, 7), offset=offset)
  variables = _perturbed(ref.init(jax.random.key(0), x, use_running_average=False))
  w = _x((3, 6, 5, 7), seed=1)  # a loss that weights every output differently

  def loss(module, params, x):
    y, upd = module.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      use_running_average=False,
      mutable=["batch_stats"],
    )
    return jnp.sum(jnp.sin(y) * w), (y, upd["batch_stats"])

  outs = {}
  for name, module in (("ref", ref), ("new", new)):
    fn = jax.jit(jax.value_and_grad(lambda p, x, m=module: loss(m, p, x), (0, 1), has_aux=True))
    (value, (y, stats)), (gp, gx) = fn(variables["params"], x)
    outs[name] = (value, y, stats, gp, gx)
  (v0, y0, s0, gp0, gx0), (v1, y1, s1, gp1, gx1) = outs["ref"], outs["new"]
  np.testing.assert_allclose(y1, y0, **F32_TOL)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5)
  for k in ("scale", "bias"):
    np.testing.assert_allclose(gp1[k], gp0[k], rtol=1e-4, atol=1e-4)
  for k in ("mean", "var"):
    np.testing.assert_allclose(s1[k], s0[k], **F32_TOL)
  # The statistics really moved: momentum 0.9 towards the batch's.
  batch_mean = np.asarray(x).reshape(-1, 7).mean(0)
  expect = 0.9 * np.asarray(variables["batch_stats"]["mean"]) + 0.1 * batch_mean
  np.testing.assert_allclose(s1["mean"], expect, rtol=1e-5, atol=1e-5)


def test_batch_norm_gradient_through_returned_statistics_matches_autodiff():
  x = _x((4, 3, 3, 2), seed=5)
  scale, bias = jnp.asarray([1.5, 0.5]), jnp.asarray([0.1, -0.2])

  def via(fn):
    def f(x):
      y, mean, var = fn(x)
      return jnp.sum(y * y) + jnp.sum(mean * 3.0) + jnp.sum(jnp.sqrt(var))

    return jax.grad(f)(x)

  custom = via(lambda x: layers.batch_norm_train(x, scale, bias, 1e-5, jnp.dtype(jnp.float32)))

  def plain(x):  # flax's formulas, differentiated by jax
    mean = jnp.mean(x, (0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(x * x, (0, 1, 2)) - mean**2)
    return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias, mean, var

  np.testing.assert_allclose(custom, via(plain), rtol=1e-4, atol=1e-5)


def test_batch_norm_use_running_average_equals_flax_and_leaves_stats():
  ref, new = _bn_pair()
  x = _x((2, 4, 4, 3), offset=1.0)
  variables = _perturbed(ref.init(jax.random.key(0), x, use_running_average=False))
  y0, u0 = ref.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  y1, u1 = new.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y1, y0, **F32_TOL)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(u1["batch_stats"][k], variables["batch_stats"][k])
  # Eval mode differs from train mode (so the comparison above can fail).
  y_train, _ = new.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert not np.allclose(y_train, y1, atol=1e-3)


def test_batch_norm_bfloat16_close_to_flax_and_saves_only_bf16_input_and_stats():
  ref, new = _bn_pair(dtype=jnp.bfloat16)
  x = _x((4, 8, 8, 16), offset=0.5).astype(jnp.bfloat16)
  variables = _perturbed(ref.init(jax.random.key(0), x, use_running_average=False))

  def loss(module):
    def f(params, x):
      y, _ = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        use_running_average=False,
        mutable=["batch_stats"],
      )
      return jnp.sum(y.astype(jnp.float32) ** 2), y

    return f

  (l0, y0), g0 = jax.value_and_grad(loss(ref), has_aux=True)(variables["params"], x)
  (l1, y1), g1 = jax.value_and_grad(loss(new), has_aux=True)(variables["params"], x)
  assert y1.dtype == jnp.bfloat16
  # Same float32 math, same final rounding to bf16: identical forward.
  np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y0, np.float32))
  for k in ("scale", "bias"):
    np.testing.assert_allclose(g1[k], g0[k], rtol=2e-2, atol=2e-2)
  # Residuals of the custom VJP: the bf16 input and per-channel float32 vectors only.
  _, vjp = jax.vjp(
    lambda x: layers.batch_norm_train(
      x, variables["params"]["scale"], variables["params"]["bias"], 1e-5, jnp.dtype(jnp.bfloat16)
    )[0],
    x,
  )
  big = [leaf for leaf in jax.tree.leaves(vjp) if leaf.size > 16]
  assert [(a.dtype, a.shape) for a in big] == [(jnp.bfloat16, x.shape)]


# --------------------------------------------------------------------------- Conv


def _conv_pair(features, kernel, strides=1, use_bias=False, dtype=jnp.float32, **opts):
  ref = nn.Conv(features, kernel, strides=strides, use_bias=use_bias, dtype=dtype)
  new = layers.Conv(features, kernel, strides=strides, use_bias=use_bias, dtype=dtype, **opts)
  return ref, new


def _conv_check(ref, new, x, fwd_tol=1e-5, grad_tol=1e-4):
  v = ref.init(jax.random.key(1), x)
  v_new = new.init(jax.random.key(1), x)
  assert jax.tree.structure(v) == jax.tree.structure(v_new)
  for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v_new), strict=True):
    np.testing.assert_array_equal(a, b)  # same names, shapes and init
  if "bias" in v["params"]:
    v = {"params": {**v["params"], "bias": v["params"]["bias"] + 0.25}}
  w = _x(ref.apply(v, x).shape, seed=9)

  def loss(module):
    return lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) * w)

  y0, y1 = ref.apply(v, x), new.apply(v, x)
  np.testing.assert_allclose(
    np.asarray(y1, np.float32), np.asarray(y0, np.float32), rtol=fwd_tol, atol=fwd_tol
  )
  g0 = jax.jit(jax.grad(loss(ref), (0, 1)))(v, x)
  g1 = jax.jit(jax.grad(loss(new), (0, 1)))(v, x)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(
      np.asarray(b, np.float32),
      np.asarray(a, np.float32),
      rtol=grad_tol,
      atol=grad_tol * float(np.abs(a).max()),
    )


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("use_bias", [False, True])
def test_1x1_conv_as_dot_equals_nn_conv(strides, use_bias):
  ref, new = _conv_pair(6, (1, 1), strides=strides, use_bias=use_bias)
  _conv_check(ref, new, _x((2, 8, 8, 5)))


def test_1x1_conv_as_dot_is_a_dot_not_a_convolution():
  _, new = _conv_pair(6, (1, 1), strides=2)
  x = _x((2, 8, 8, 5))
  v = new.init(jax.random.key(0), x)
  text = str(jax.make_jaxpr(new.apply)(v, x))
  assert "dot_general" in text and "conv_general_dilated" not in text


def test_1x1_conv_bfloat16_equals_nn_conv():
  ref, new = _conv_pair(6, (1, 1), dtype=jnp.bfloat16)
  _conv_check(ref, new, _x((2, 8, 8, 16)), fwd_tol=2e-2, grad_tol=2e-2)


@pytest.mark.parametrize("kernel, strides", [((3, 3), 1), ((3, 3), 2), ((7, 7), 2)])
def test_gemm_weight_gradient_equals_jax_conv_gradient(kernel, strides):
  ref, new = _conv_pair(4, kernel, strides=strides, weight_grad="gemm")
  _conv_check(ref, new, _x((2, 12, 12, 3)))


def test_gemm_weight_gradient_is_a_dot():
  _, new = _conv_pair(4, (3, 3), weight_grad="gemm")
  x = _x((2, 8, 8, 3))
  v = new.init(jax.random.key(0), x)
  grad = jax.grad(lambda p: jnp.sum(new.apply({"params": p}, x)))
  text = str(jax.make_jaxpr(grad)(v["params"]))
  assert "dot_general" in text


@pytest.mark.parametrize("transform", ["space_to_depth", "pad8"])
@pytest.mark.parametrize("strides", [2, 4])
def test_stem_transforms_equal_the_plain_strided_conv(transform, strides):
  ref, new = _conv_pair(5, (7, 7), strides=strides, input_transform=transform)
  _conv_check(ref, new, _x((2, 16, 16, 1)))


def test_space_to_depth_stem_with_gemm_weight_gradient():
  ref, new = _conv_pair(5, (7, 7), strides=2, input_transform="space_to_depth", weight_grad="gemm")
  _conv_check(ref, new, _x((2, 16, 16, 1)))


@pytest.mark.parametrize(
  "size, kernel, stride, expect",
  [
    (512, 7, 2, (2, 3)),
    (16, 3, 2, (0, 1)),
    (16, 3, 1, (1, 1)),
    (16, 1, 2, (0, 0)),
  ],
)
def test_same_padding_matches_xla(size, kernel, stride, expect):
  assert layers.same_padding(size, kernel, stride) == expect


# ------------------------------------------------------------ inputs read without forming


class _ConcatInput(nn.Module):
  """The reference: nn.Conv of concat([U(coarse), *parts]) (Eq. 2 and 3 as written)."""

  kernel: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    coarse, parts = x
    up = [jnp.repeat(jnp.repeat(coarse, 2, 1), 2, 2)] if coarse is not None else []
    return nn.Conv(4, self.kernel, use_bias=False, name="Conv_0")(
      jnp.concatenate(up + list(parts), -1)
    )


class _PartsInput(nn.Module):
  kernel: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    coarse, parts = x
    return layers.Conv(4, self.kernel, name="Conv_0")(list(parts), coarse=coarse)


def test_conv_of_parts_and_upsampled_input_equals_conv_of_the_concatenation():
  coarse = _x((2, 5, 5, 3), seed=4)
  parts = (_x((2, 10, 10, 2), seed=5), _x((2, 10, 10, 3), seed=6))
  _conv_check(_ConcatInput((3, 3)), _PartsInput((3, 3)), (coarse, parts))


def test_conv_of_preallocated_storage_reads_only_the_written_channels():
  x = _x((2, 6, 6, 3))
  ref = nn.Conv(4, (3, 3), use_bias=False)
  v = ref.init(jax.random.key(1), x)
  storage = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, 5)))  # 5 channels not yet written
  y = layers.Conv(4, (3, 3)).apply(v, storage, in_features=3)
  np.testing.assert_allclose(y, ref.apply(v, x), **F32_TOL)
