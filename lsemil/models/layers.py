"""Drop-in speed variants of flax's BatchNorm and Conv for the model of Sec 3 (Fig. 2).

Same parameter names, shapes and initialisers as `flax.linen.BatchNorm` / `nn.Conv` (the
classes are named `BatchNorm` and `Conv`, so flax auto-names them `BatchNorm_i` / `Conv_i`
and checkpoints load either way); same forward numerics up to float rounding.

- `BatchNorm`: batch statistics as flax computes them (float32, E[x^2] - E[x]^2, clipped at
  0), with a custom VJP that saves only the input (in the compute dtype) and the per-channel
  float32 mean and inverse std, as cuDNN and PyTorch do. Autodiff of flax's BatchNorm keeps
  float32 intermediates for the backward pass (the bulk of bf16 training's saved residuals).
- `Conv`: 1x1 convolutions as a `dot_general` (a strided 1x1 is a subsampling then a dot);
  optionally the weight gradient of k x k convolutions as im2col + one GEMM
  (`weight_grad='gemm'`); optionally the strided stem as a space-to-depth conv or with its
  input channels zero-padded to 8 (`input_transform`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")
WEIGHT_GRADS = ("xla", "gemm")
INPUT_TRANSFORMS = ("none", "space_to_depth", "pad8")


# --------------------------------------------------------------------------- BatchNorm


def _batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """flax's float32 batch statistics: mean and max(0, E[x^2] - E[x]^2) over all but channels."""
  x32 = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x32, axes)
  var = jnp.maximum(0.0, jnp.mean(lax.square(x32), axes) - lax.square(mean))
  return mean, var


def _bn_fwd_math(x, scale, bias, epsilon, out_dtype):
  mean, var = _batch_stats(x)
  inv = lax.rsqrt(var + epsilon)
  # flax's _normalize: (x - mean) * (rsqrt(var + eps) * scale) + bias, in float32, one fusion.
  y = ((x.astype(jnp.float32) - mean) * (inv * scale) + bias).astype(out_dtype)
  return y, mean, var, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, out_dtype: Any):
  """Training-mode batch norm over all axes but the last; returns (y, mean, biased var)."""
  y, mean, var, _ = _bn_fwd_math(x, scale, bias, epsilon, out_dtype)
  return y, mean, var


def _bn_fwd(x, scale, bias, epsilon, out_dtype):
  x, scale, bias = x.value, scale.value, bias.value  # symbolic_zeros: CustomVJPPrimal
  y, mean, var, inv = _bn_fwd_math(x, scale, bias, epsilon, out_dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _bn_bwd(epsilon, out_dtype, res, cts):
  del epsilon, out_dtype
  x, mean, inv, scale = res
  dy, dmean, dvar = cts
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  centred = x.astype(jnp.float32) - mean
  xhat = centred * inv
  zero = jax.custom_derivatives.SymbolicZero
  if isinstance(dy, zero):
    dy32 = jnp.zeros(x.shape, jnp.float32)
  else:
    dy32 = dy.astype(jnp.float32)
  dbias = jnp.sum(dy32, axes)
  dscale = jnp.sum(dy32 * xhat, axes)
  dx = (scale * inv) * (dy32 - (dbias + xhat * dscale) * (1.0 / n))
  # Cotangents of the returned statistics (zero in training: they only feed batch_stats).
  if not isinstance(dmean, zero):
    dx = dx + dmean * (1.0 / n)
  if not isinstance(dvar, zero):
    dx = dx + dvar * (2.0 / n) * centred
  return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_bn_fwd, _bn_bwd, symbolic_zeros=True)


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm(axis=-1)` with a lean custom VJP (see the module docstring).

  Variables: params 'scale', 'bias'; batch_stats 'mean', 'var' (float32), as flax's. The
  running averages update as flax's do (momentum, biased variance, not while initialising).
  """

  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)
    out_dtype = jnp.dtype(self.dtype or jnp.promote_types(x.dtype, self.param_dtype))
    if use_ra:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale32
      return ((x.astype(jnp.float32) - ra_mean.value) * mul + bias32).astype(out_dtype)
    y, mean, var = batch_norm_train(x, scale32, bias32, float(self.epsilon), out_dtype)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


# --------------------------------------------------------------------------- convolutions


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA's 'SAME' padding (lo, hi) of one spatial axis: lo = total // 2."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def im2col(x: jax.Array, kernel: tuple[int, int], stride: int, padding) -> jax.Array:
  """(B, H, W, C) -> (B, Ho, Wo, kh * kw * C) patches, in HWIO order of a conv kernel."""
  (kh, kw), (b, h, w, _) = kernel, x.shape
  if padding == "SAME":
    pads = (same_padding(h, kh, stride), same_padding(w, kw, stride))
  else:  # 'VALID' or explicit ((lo, hi), (lo, hi))
    pads = ((0, 0), (0, 0)) if padding == "VALID" else padding
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (h + sum(pads[0]) - kh) // stride + 1
  wo = (w + sum(pads[1]) - kw) // stride + 1
  cols = [
    lax.slice(
      xp,
      (0, i, j, 0),
      (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, xp.shape[3]),
      (1, stride, stride, 1),
    )
    for i in range(kh)
    for j in range(kw)
  ]
  return jnp.concatenate(cols, axis=-1)


def _conv(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_gemm_weight_grad(x, w, stride: int, padding):
  """`lax.conv_general_dilated` (NHWC, HWIO) whose weight gradient is im2col(x)^T @ dy."""
  return _conv(x, w, stride, padding)


def _cgw_fwd(x, w, stride, padding):
  return _conv(x, w, stride, padding), (x, w)


def _cgw_bwd(stride, padding, res, dy):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _conv(x_, w, stride, padding), x)
  (dx,) = vjp_x(dy)  # XLA's own input gradient; dead code when x is the data (the stem)
  cols = im2col(x, w.shape[:2], stride, padding)
  k, o = cols.shape[-1], dy.shape[-1]
  dw = lax.dot_general(
    cols.reshape(-1, k),
    dy.reshape(-1, o),
    (((0,), (0,)), ((), ())),
    preferred_element_type=jnp.float32,
  )
  return dx, dw.reshape(w.shape).astype(w.dtype)


conv_gemm_weight_grad.defvjp(_cgw_fwd, _cgw_bwd)


def space_to_depth_conv_operands(x, w, stride: int):
  """A stride-s 'SAME' conv as a stride-1 'VALID' conv on s x s space-to-depth blocks.

  out[i] = sum_t xp[s i + t] w[t] = sum_{a, b} z[i + a, b] w[s a + b] with z[j, b] = xp[s j + b]:
  the kernel is zero-padded to kb * s taps (kb = ceil(k / s)) and regrouped to
  (kb, kb, s * s * C, O). Same sums, same outputs; returns (z, w').
  """
  b, h, wd, c = x.shape
  k, o = w.shape[0], w.shape[-1]
  kb = -(-k // stride)
  (lo_h, _), (lo_w, _) = same_padding(h, k, stride), same_padding(wd, k, stride)
  ho, wo = -(-h // stride), -(-wd // stride)
  hz, wz = ho + kb - 1, wo + kb - 1
  xp = jnp.pad(x, ((0, 0), (lo_h, hz * stride - h - lo_h), (lo_w, wz * stride - wd - lo_w), (0, 0)))
  z = xp.reshape(b, hz, stride, wz, stride, c).transpose(0, 1, 3, 2, 4, 5)
  z = z.reshape(b, hz, wz, stride * stride * c)
  wp = jnp.pad(w, ((0, kb * stride - k), (0, kb * stride - k), (0, 0), (0, 0)))
  wp = wp.reshape(kb, stride, kb, stride, c, o).transpose(0, 2, 1, 3, 4, 5)
  return z, wp.reshape(kb, kb, stride * stride * c, o)


def upsampled_input_kernel(kernel: jax.Array, factor: int = 2) -> tuple[jax.Array, Any]:
  """conv(U(a), kernel, 'SAME') as a conv of `a` itself, U the nearest x`factor` upsampling.

  Output pixel f i + p (phase p < f) of a k-tap 'SAME' conv (lo = (k - 1) // 2 zeros before)
  reads U(a)[f i + p + t - lo] = a[i + (p + t - lo) // f]: tap t of phase p lands on offset
  (p + t - lo) // f of `a`, and the zeros U(a) is padded with are the zeros `a` is padded
  with. So one stride-1 conv of `a` whose kernel sums, per phase and offset, the taps that
  land there gives all f x f phases as f * f * O channels (same parameters; the sums
  regrouped). Returns (that kernel (kb, kb, C, f * f * O), its explicit padding); the
  result is depth-to-space'd by `phases_to_space`.
  """
  k = kernel.shape[0]
  lo = (k - 1) // 2
  first, last = (0 - lo) // factor, (factor - 1 + k - 1 - lo) // factor
  taps = last - first + 1
  # place[p, o, t] = 1 where tap t of phase p reads offset first + o.
  place = [[[float((p + t - lo) // factor == first + o) for t in range(k)]
            for o in range(taps)] for p in range(factor)]  # fmt: skip
  place = jnp.asarray(place, kernel.dtype)
  w = jnp.einsum("pat,qbs,tsco->abcpqo", place, place, kernel)
  c, o = kernel.shape[2], kernel.shape[3]
  return w.reshape(taps, taps, c, factor * factor * o), ((-first, last), (-first, last))


def phases_to_space(y: jax.Array, factor: int = 2) -> jax.Array:
  """(B, h, w, f * f * O) phases -> (B, f h, f w, O): out[f i + p, f j + q] = y[i, j, (p, q)]."""
  b, h, w, c = y.shape
  o = c // (factor * factor)
  y = y.reshape(b, h, w, factor, factor, o).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, h * factor, w * factor, o)


class Conv(nn.Module):
  """`flax.linen.Conv(padding='SAME', feature_group_count=1)` on NHWC with speed options.

  Params 'kernel' (kh, kw, C, features) lecun-normal and 'bias' (features,) zeros, as flax's.
  - `dot_1x1`: a 1x1 conv is `x[:, ::s, ::s] @ kernel[0, 0]` (the 'SAME' padding of a 1x1
    conv is zero when s divides the side), a GEMM instead of a convolution.
  - `weight_grad`: 'xla' (jax's conv transpose) or 'gemm' (`conv_gemm_weight_grad`).
  - `input_transform`: 'none', 'space_to_depth' (`space_to_depth_conv_operands`) or 'pad8'
    (input channels zero-padded to a multiple of 8, for tensor cores; same sums).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  dot_1x1: bool = True
  weight_grad: str = "xla"
  input_transform: str = "none"

  @nn.compact
  def __call__(
    self, x: Any, coarse: jax.Array | None = None, in_features: int | None = None
  ) -> jax.Array:
    """conv(x) (x an array), with two ways to read an input without forming it:

    - `x` a sequence of arrays: the conv of their channel concatenation, as the sum of each
      one's conv with its slice of the kernel (a DenseNet block's growing input, Eq. 2);
    - `coarse` (half the side): the conv of concat([U(coarse), x]) with U the nearest x2
      upsampling (Eq. 3), U(coarse)'s share as a conv of `coarse` at its own resolution
      (`upsampled_input_kernel`);
    - `in_features`: only x's first `in_features` channels are the input; the rest are
      zeros (preallocated storage), so the kernel is zero-padded over them.

    Same parameters as the conv of the concatenated input; the same sums, regrouped.
    """
    kh, kw = self.kernel_size
    parts = list(x) if isinstance(x, list | tuple) else [x]
    extra = 0 if coarse is None else coarse.shape[-1]
    width = sum(p.shape[-1] for p in parts) if in_features is None else in_features
    shape = (kh, kw, extra + width, self.features)
    kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
    if len(parts) == 1 and coarse is None and in_features is None:
      y = self._apply(parts[0].astype(self.dtype), kernel.astype(self.dtype))
    else:
      y, start = None, extra
      for part in parts:
        k = kernel[:, :, start : start + min(part.shape[-1], width)]
        start += part.shape[-1]
        if k.shape[2] < part.shape[-1]:  # in_features: zeros beyond
          k = jnp.pad(k, ((0, 0), (0, 0), (0, part.shape[-1] - k.shape[2]), (0, 0)))
        term = self._apply(part.astype(self.dtype), k.astype(self.dtype))
        y = term if y is None else y + term
    if coarse is not None:
      if self.strides != 1 or kh != kw or 2 * coarse.shape[1] != parts[0].shape[1]:
        raise ValueError(f"an upsampled input needs a square stride-1 conv of half the side, "
                         f"got {coarse.shape} for {parts[0].shape}")  # fmt: skip
      phased, pads = upsampled_input_kernel(kernel[:, :, :extra])
      low = lax.conv_general_dilated(
        coarse.astype(self.dtype), phased.astype(self.dtype), (1, 1), pads, dimension_numbers=_DN
      )
      y = y + phases_to_space(low)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(
        self.dtype
      )
    return y

  def _apply(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    s = int(self.strides)
    h, w = x.shape[1:3]
    if self.dot_1x1 and kh == kw == 1 and h % s == 0 and w % s == 0:
      xs = x[:, ::s, ::s, :] if s > 1 else x
      return lax.dot_general(xs, kernel[0, 0], (((3,), (0,)), ((), ())))
    padding = "SAME"
    if self.input_transform == "space_to_depth" and s > 1 and h % s == 0 and w % s == 0:
      x, kernel = space_to_depth_conv_operands(x, kernel, s)
      s, padding = 1, "VALID"
    elif self.input_transform == "pad8" and x.shape[-1] % 8:
      extra = 8 - x.shape[-1] % 8
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
      kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
    if self.weight_grad == "gemm" and kernel.shape[0] * kernel.shape[1] > 1:
      return conv_gemm_weight_grad(x, kernel, s, padding)
    return _conv(x, kernel, s, padding)
