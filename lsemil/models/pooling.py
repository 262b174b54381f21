"""MIL pooling of saliency maps into image-level probabilities (Sec 3.4, 3.5).

Every function takes saliency maps `s` shaped `(..., H, W, K)` with values in
[0, 1] and returns `(..., K)` float32. Reductions run in float32 whatever the
input dtype (bfloat16 maps are accepted), and each function is written in its
numerically stable form, which is the paper's argument for LSE-LBA (Sec 3.5):

* `lse_lba`  Eq. (4): (1/r) * (logsumexp(r*S) - log(HW)), r = r0 + exp(beta).
* `lse`      the same with a fixed r (Sec 3.4).
* `generalized_mean`  (mean S^r)^(1/r), evaluated as exp((logsumexp(r log S) - log HW) / r).
* `noisy_or` 1 - prod(1 - S), evaluated through a sum of log1p(-S).
* `max_pool`, `mean_pool`  the two extremes.

`LSELBAPool` is the flax module that owns beta (one per class by default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

# Smallest r the r < 1 branch of `lse` evaluates at: there LSE_r - mean <= r (max S - min S)^2 / 8
# is far below float32 resolution, and 1/r^2 in the backward pass stays finite (r0 = 0 with
# beta -> -inf drives r = exp(beta) to 0, where 0/0 and 1/0^2 would give NaN).
_R_FLOOR = 1e-16

# Added inside log() of the generalized mean so that S = 0 gives a finite log
# (log(1e-30) ~ -69) and finite gradients; far below any float32 saliency that matters.
_GM_LOG_FLOOR = 1e-30


def _as_f32(s: jax.Array) -> jax.Array:
  return jnp.asarray(s).astype(jnp.float32)


def _spatial_size(s: jax.Array) -> int:
  if s.ndim < 3:
    raise ValueError(f"saliency maps must be shaped (..., H, W, K); got shape {s.shape}")
  return s.shape[-3] * s.shape[-2]


def sharpness(beta: jax.Array, r0: float) -> jax.Array:
  """r = r0 + exp(beta), the lower-bounded adaptive sharpness of Eq. (4)."""
  return r0 + jnp.exp(jnp.asarray(beta, jnp.float32))


def lse(s: jax.Array, r: jax.Array | float) -> jax.Array:
  """Log-sum-exp pooling with sharpness r (Sec 3.4): (1/r) log(mean exp(r S)).

  `r` is a scalar or shaped `(K,)` (broadcast against the class axis); r > 0.
  Computed as (logsumexp(r S) - log(HW)) / r, never as exp-then-log; for r < 1 through
  an equal log1p/expm1 form that keeps the r -> 0 limit (the mean) accurate.
  """
  s = _as_f32(s)
  r = jnp.asarray(r, jnp.float32)
  n = _spatial_size(s)
  # r is clamped to each branch's range, so the unselected side stays finite and where()
  # passes clean gradients (where, not maximum: a tie at r = 1 would halve d/dr).
  r_big = jnp.where(r < 1.0, 1.0, r)
  by_logsumexp = (jax.nn.logsumexp(r_big * s, axis=(-3, -2)) - jnp.log(float(n))) / r_big
  # For r < 1, logsumexp - log(HW) cancels catastrophically (float32 error ~ 1e-6/r),
  # so use the algebraically equal max(S) + log1p(mean(expm1(r (S - max S)))) / r, whose
  # arguments lie in [-1, 0] there.
  r_small = jnp.clip(r, _R_FLOOR, 1.0)
  s_max = jnp.max(s, axis=(-3, -2), keepdims=True)
  by_log1p = jnp.squeeze(s_max, axis=(-3, -2)) + jnp.log1p(
    jnp.mean(jnp.expm1(r_small * (s - s_max)), axis=(-3, -2))
  ) / r_small
  return jnp.where(r < 1.0, by_log1p, by_logsumexp)


def lse_lba(s: jax.Array, beta: jax.Array | float, r0: float) -> jax.Array:
  """LSE-LBA pooling, Eq. (4) of Sec 3.5.

  p = 1/(r0 + e^beta) * log( 1/(wh) * sum_ij exp[(r0 + e^beta) S_ij] ).

  Args:
    s: saliency maps `(..., H, W, K)` in [0, 1]; any float dtype.
    beta: learned log-offset of the sharpness, a scalar or `(K,)`.
    r0: the sharpness prior (lower bound of r), >= 0.

  Returns:
    `(..., K)` float32 probabilities: in [0, 1] when S is, between mean(S) and max(S).
  """
  return lse(s, sharpness(beta, r0))


def generalized_mean(s: jax.Array, r: jax.Array | float) -> jax.Array:
  """Generalized mean (mean S^r)^(1/r) (Sec 3.4), computed through logs.

  exp((logsumexp(r log S) - log HW) / r): no S^r is formed, so small S at large r
  does not underflow to 0 (it stays representable as long as the result is).
  """
  s = _as_f32(s)
  r = jnp.asarray(r, jnp.float32)
  n = _spatial_size(s)
  log_s = jnp.log(s + _GM_LOG_FLOOR)
  return jnp.exp((jax.nn.logsumexp(r * log_s, axis=(-3, -2)) - jnp.log(float(n))) / r)


def log1m_noisy_or(s: jax.Array) -> jax.Array:
  """log(1 - NOR(S)) = sum log1p(-S): the stable negative-label log-likelihood."""
  return jnp.sum(jnp.log1p(-_as_f32(s)), axis=(-3, -2))


def noisy_or(s: jax.Array) -> jax.Array:
  """Noisy-OR pooling 1 - prod(1 - S) (Sec 3.4), through a sum of log1p(-S).

  Evaluated as -expm1(sum log1p(-S)), which keeps tiny probabilities (sum S ~ 1e-30)
  instead of rounding 1 - prod to 0. An entry of exactly 1 (a saturated float32 sigmoid)
  makes NOR exactly 1; such entries are kept out of the log-sum so the backward pass never
  forms exp(-inf) * inf = NaN (the class's gradient is then 0: exact for the other entries,
  whose factor 1 - 1 = 0).
  """
  s = _as_f32(s)
  saturated = s >= 1.0
  nor = -jnp.expm1(log1m_noisy_or(jnp.where(saturated, 0.0, s)))
  return jnp.where(jnp.any(saturated, axis=(-3, -2)), 1.0, nor)


def max_pool(s: jax.Array) -> jax.Array:
  """Max pooling over H, W (the r -> inf limit of LSE)."""
  return jnp.max(_as_f32(s), axis=(-3, -2))


def mean_pool(s: jax.Array) -> jax.Array:
  """Average pooling over H, W (the r -> 0 limit of LSE)."""
  return jnp.mean(_as_f32(s), axis=(-3, -2))


class LSELBAPool(nn.Module):
  """LSE-LBA pooling (Eq. 4) owning the learned beta.

  Attributes:
    r0: sharpness prior, the lower bound of r = r0 + exp(beta).
    per_class_beta: one beta per class (shape (K,)) or one shared scalar.
    beta_init: initial beta (r starts at r0 + exp(beta_init)).
  """

  r0: float
  per_class_beta: bool = True
  beta_init: float = 0.0

  @nn.compact
  def __call__(self, s: jax.Array) -> jax.Array:
    shape = (s.shape[-1],) if self.per_class_beta else ()
    beta = self.param("beta", nn.initializers.constant(self.beta_init), shape, jnp.float32)
    return lse_lba(s, beta, self.r0)


class FixedPool(nn.Module):
  """A parameter-free pooling from this module, selected by name (for ablations).

  Names: 'lse' and 'generalized_mean' (sharpness `r`), 'noisy_or', 'max', 'mean'.
  """

  kind: str
  r: float = 5.0

  @nn.compact
  def __call__(self, s: jax.Array) -> jax.Array:
    if self.kind == "lse":
      return lse(s, self.r)
    if self.kind == "generalized_mean":
      return generalized_mean(s, self.r)
    if self.kind == "noisy_or":
      return noisy_or(s)
    if self.kind == "max":
      return max_pool(s)
    if self.kind == "mean":
      return mean_pool(s)
    raise ValueError(f"unknown pooling {self.kind!r}")


POOLINGS = ("lse_lba", "lse", "generalized_mean", "noisy_or", "max", "mean")
