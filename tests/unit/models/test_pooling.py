"""lsemil.models.pooling: the LSE-LBA claims of Sec 3.5 and the other MIL poolings of Sec 3.4.

Oracles are float64 NumPy/SciPy evaluations of the paper's formulas. Bounds that hold in exact
arithmetic are checked with a float32 rounding slack of TOL.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp

from lsemil.models import pooling

TOL = 1e-6  # float32 rounding slack on bounds that are exact in real arithmetic
SIZES = (8, 16, 32, 64, 128, 256, 512)
SPATIAL = (-3, -2)
ALL_POOLS = {
  "lse_lba": lambda s: pooling.lse_lba(s, 0.5, 5.0),
  "lse": lambda s: pooling.lse(s, 3.0),
  "generalized_mean": lambda s: pooling.generalized_mean(s, 3.0),
  "noisy_or": pooling.noisy_or,
  "max": pooling.max_pool,
  "mean": pooling.mean_pool,
}


# ------------------------------------------------------------------------------ helpers


def _rand_map(shape, seed, low=0.0, high=1.0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _oracle_lse(s, r) -> np.ndarray:
  """(1/r) log(mean exp(r S)) in float64 (Sec 3.4); r broadcasts over the class axis."""
  s = np.asarray(s, np.float64)
  r = np.asarray(r, np.float64)
  n = s.shape[-3] * s.shape[-2]
  return (logsumexp(r * s, axis=SPATIAL) - np.log(n)) / r


def _oracle_gm(s, r) -> np.ndarray:
  """(mean S^r)^(1/r) in float64, through logs (S > 0)."""
  s = np.asarray(s, np.float64)
  n = s.shape[-3] * s.shape[-2]
  return np.exp((logsumexp(r * np.log(s), axis=SPATIAL) - np.log(n)) / r)


def _np(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# Jitted entry points (one compile per shape) keep the loops and hypothesis examples fast.
_lse_lba = jax.jit(pooling.lse_lba)
_lse = jax.jit(pooling.lse)
_gm = jax.jit(pooling.generalized_mean)
_nor = jax.jit(pooling.noisy_or)
# LSE-LBA over a grid of betas (and r0s): (G,) -> (G, ..., K).
_lse_lba_betas = jax.jit(jax.vmap(pooling.lse_lba, in_axes=(None, 0, None)))
_lse_lba_grid = jax.jit(jax.vmap(pooling.lse_lba, in_axes=(None, 0, 0)))


# Small maps for hypothesis: a few fixed shapes keep the jax dispatch caches warm.
_SHAPES = st.sampled_from([(1, 1, 1), (2, 3, 1), (4, 4, 2), (5, 3, 3), (8, 8, 2)])
_UNIT = st.floats(0.0, 1.0, width=32)
maps = _SHAPES.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=_UNIT))
betas = st.floats(-12.0, 6.0, width=32)
r0s = st.sampled_from([0.0, 0.5, 5.0, 10.0])
HYP = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------ bounds (Sec 3.5)


@HYP
@given(s=maps, beta=betas, r0=r0s)
def test_lse_lba_in_unit_interval_and_between_mean_and_max(s, beta, r0):
  p = _np(_lse_lba(s, beta, r0))
  s64 = s.astype(np.float64)
  assert p.shape == (s.shape[-1],)
  assert np.all(p >= -TOL) and np.all(p <= 1 + TOL)
  assert np.all(s64.mean(axis=SPATIAL) - TOL <= p)
  assert np.all(p <= s64.max(axis=SPATIAL) + TOL)


@HYP
@given(s=maps, beta=betas, r0=r0s)
def test_lse_lba_within_hoeffding_bound_of_mean(s, beta, r0):
  # 0 <= LSE_r(S) - mean(S) <= r (max - min)^2 / 8 (Hoeffding's lemma): the gap to the mean
  # vanishes linearly as r -> 0.
  r = r0 + np.exp(np.float64(beta))
  p = _np(_lse_lba(s, beta, r0))
  s64 = s.astype(np.float64)
  gap = p - s64.mean(axis=SPATIAL)
  spread = s64.max(axis=SPATIAL) - s64.min(axis=SPATIAL)
  assert np.all(gap >= -TOL)
  assert np.all(gap <= r * spread**2 / 8 + TOL)


@HYP
@given(s=maps, beta=betas, r0=r0s, data=st.data())
def test_lse_lba_non_decreasing_in_every_entry(s, beta, r0, data):
  h, w, k = s.shape
  i, j, c = (data.draw(st.integers(0, d - 1)) for d in (h, w, k))
  bumped = s.copy()
  bumped[i, j, c] = data.draw(st.floats(float(s[i, j, c]), 1.0, width=32))
  before, after = _np(_lse_lba(s, beta, r0)), _np(_lse_lba(bumped, beta, r0))
  assert after[c] >= before[c] - TOL
  others = np.arange(k) != c
  np.testing.assert_array_equal(after[others], before[others])


@HYP
@given(s=maps, r0=r0s)
def test_lse_lba_non_decreasing_in_beta_and_r0(s, r0):
  beta_grid = np.linspace(-12.0, 6.0, 37, dtype=np.float32)
  p = _np(_lse_lba_betas(s, beta_grid, r0))
  assert np.all(np.diff(p, axis=0) >= -TOL)
  r0_grid = np.array([0.0, 0.1, 1.0, 2.0, 5.0, 10.0, 50.0], np.float32)
  q = _np(_lse_lba_grid(s, np.zeros_like(r0_grid), r0_grid))
  assert np.all(np.diff(q, axis=0) >= -TOL)


@pytest.mark.parametrize("size", [8, 64, 512])
def test_lse_lba_strictly_increasing_in_beta_and_r0_on_a_spread_map(size):
  # The bounds above allow a constant function; a non-constant map must actually move.
  s = _rand_map((size, size, 2), seed=size)
  p = _np(_lse_lba_betas(s, np.linspace(-4.0, 4.0, 9, dtype=np.float32), 0.0))
  assert np.all(np.diff(p, axis=0) > 0)
  r0_grid = np.array([0.0, 1.0, 5.0, 10.0, 30.0], np.float32)
  q = _np(_lse_lba_grid(s, np.full_like(r0_grid, -1.0), r0_grid))
  assert np.all(np.diff(q, axis=0) > 0)


@pytest.mark.parametrize("size", [8, 64, 512])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lse_lba_all_zeros_is_0_and_all_ones_is_1(size, dtype):
  zeros, ones = jnp.zeros((size, size, 3), dtype), jnp.ones((size, size, 3), dtype)
  # Every (r0, beta) pair, scalar beta and per-class beta, r from ~1e-13 to ~3e4.
  r0_grid, beta_grid = np.meshgrid([0.0, 5.0, 10.0], [-30.0, -3.0, 0.0, 1.0, 2.5, 10.0])
  r0_grid, beta_grid = r0_grid.ravel().astype(np.float32), beta_grid.ravel().astype(np.float32)
  per_class = np.stack([beta_grid, beta_grid[::-1], np.zeros_like(beta_grid)], axis=-1)
  for beta in (beta_grid, per_class):
    np.testing.assert_allclose(_np(_lse_lba_grid(zeros, beta, r0_grid)), 0.0, atol=1e-6)
    np.testing.assert_allclose(_np(_lse_lba_grid(ones, beta, r0_grid)), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------ limits


@pytest.mark.parametrize("size", [8, 64, 512])
def test_large_r_tends_to_max(size):
  # max(S) - log(HW) / r <= LSE_r(S) <= max(S), so LSE -> max as r -> inf. Under jit r stays
  # <= 1e8: XLA CPU contracts r * S - max(r * S) into an FMA, whose rounding residue (up to
  # ulp(r S) / 2) overflows exp() once r S > ~1e9, so jitted LSE gives inf there (eager is fine).
  s = _rand_map((size, size, 2), seed=1)
  s_max = s.astype(np.float64).max(axis=SPATIAL)
  for r in (10.0, 1e2, 1e3, 1e4, 1e6, 1e8):
    for fn in (_lse, pooling.lse):
      p = _np(fn(s, r))
      assert np.all(p <= s_max + TOL)
      assert np.all(p >= s_max - np.log(size * size) / r - TOL)
  np.testing.assert_allclose(_np(pooling.lse(s, 1e12)), s_max, atol=1e-6)
  np.testing.assert_allclose(_np(pooling.lse(s, 1e30)), s_max, atol=1e-6)
  np.testing.assert_allclose(_np(_lse_lba(s, 18.0, 5.0)), s_max, atol=1e-6)  # r ~ 6.6e7


@pytest.mark.parametrize("size", [8, 64, 512])
def test_r0_zero_and_beta_to_minus_inf_tends_to_mean(size):
  # Tested against the mean directly: below r ~ 1e-3 even a float64 oracle cancels.
  s = _rand_map((size, size, 2), seed=2)
  s_mean = s.astype(np.float64).mean(axis=SPATIAL)
  grad = jax.jit(jax.grad(lambda x, b: pooling.lse_lba(x, b, 0.0).sum(), argnums=(0, 1)))
  for beta in (-15.0, -30.0, -60.0, -87.0, -100.0, -200.0, -1e4, -np.inf):
    np.testing.assert_allclose(_np(_lse_lba(s, beta, 0.0)), s_mean, atol=2e-6, err_msg=beta)
    g_s, g_beta = grad(s, beta)
    assert np.all(np.isfinite(g_s)) and np.isfinite(g_beta), beta
    # d mean / dS = 1 / HW for every entry.
    np.testing.assert_allclose(g_s, 1.0 / size**2, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(np.sum(g_s, axis=SPATIAL), 1.0, rtol=1e-4)


# ------------------------------------------------------------------------------ float64 oracle


@pytest.mark.parametrize("size", SIZES)
def test_lse_and_lse_lba_match_float64_oracle(size):
  s = _rand_map((size, size, 3), seed=size)
  s[0, 0] = 0.0
  s[-1, -1] = 1.0
  for r in (1e-3, 0.05, 0.5, 0.999, 1.0, 1.001, 2.0, 5.0, 10.0, 50.0, 500.0):
    np.testing.assert_allclose(_np(_lse(s, r)), _oracle_lse(s, r), atol=1e-5, err_msg=r)
  for r0 in (0.0, 5.0, 10.0):
    beta = np.array([-3.0, 0.0, 1.5], np.float32)
    r = r0 + np.exp(beta.astype(np.float64))
    np.testing.assert_allclose(_np(_lse_lba(s, beta, r0)), _oracle_lse(s, r), atol=1e-5)


@pytest.mark.parametrize("size", [8, 512])
def test_lse_lba_beta_gradient_matches_float64_derivative(size):
  # dLSE_r/dr = (sum_ij w_ij S_ij - LSE_r) / r with w = softmax(r S); dr/dbeta = exp(beta).
  # Includes r = 1 exactly (r0 = 0, beta = 0), where the two evaluation branches meet.
  s = _rand_map((size, size, 2), seed=size + 1)
  s64 = s.astype(np.float64)
  grad = jax.jit(jax.grad(lambda b, r0: pooling.lse_lba(s, b, r0).sum()))
  for r0, beta in [(0.0, 0.0), (0.0, -2.0), (0.0, 1e-3), (0.0, 2.0), (5.0, 0.0), (10.0, 1.0)]:
    r = r0 + np.exp(beta)
    w = np.exp(r * s64 - logsumexp(r * s64, axis=SPATIAL, keepdims=True))
    want = np.exp(beta) * ((w * s64).sum(axis=SPATIAL) - _oracle_lse(s64, r)) / r
    got = float(grad(np.float32(beta), r0))
    np.testing.assert_allclose(got, want.sum(), rtol=2e-3, atol=1e-7, err_msg=(r0, beta))


def test_lse_lba_leading_batch_dims():
  s = _rand_map((2, 3, 16, 8, 4), seed=3)
  p = _np(_lse_lba(s, 0.7, 5.0))
  assert p.shape == (2, 3, 4)
  np.testing.assert_allclose(p, _oracle_lse(s, 5.0 + np.exp(0.7)), atol=1e-5)


# ------------------------------------------------------------------------------ gradients


def _edge_map(size, k, dtype) -> jax.Array:
  s = _rand_map((size, size, k), seed=4)
  s[:8, :8] = 0.0
  s[8:16, :8] = 1.0
  s[16:24, :8] = 1e-30
  return jnp.asarray(s).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lse_lba_gradients_finite_at_512(dtype):
  s = _edge_map(512, 3, dtype)
  assert float(jnp.min(s[16:24, :8].astype(jnp.float32))) > 0  # 1e-30 survives the cast
  grad = jax.jit(jax.grad(lambda x, b, r0: pooling.lse_lba(x, b, r0).sum(), argnums=(0, 1)))
  for r0 in (0.0, 5.0, 10.0):
    for beta in (jnp.array([-4.0, 0.0, 4.0]), jnp.float32(0.0)):
      g_s, g_beta = grad(s, beta, r0)
      assert g_s.dtype == dtype and g_s.shape == s.shape
      assert g_beta.shape == beta.shape
      g_s = np.asarray(g_s.astype(jnp.float32))
      assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_beta))
      assert np.all(g_s >= 0) and np.all(np.asarray(g_beta) >= 0)  # monotone in S and beta
      # LSE(S + c) = LSE(S) + c, so the weights over the map sum to 1 per class.
      np.testing.assert_allclose(g_s.sum(axis=SPATIAL), 1.0, rtol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["lse", "generalized_mean", "noisy_or", "max", "mean"])
def test_other_pool_gradients_finite_at_512(name, dtype):
  # Exact 1s happen in practice: sigmoid saturates to 1.0 in float32 for logits above ~17.
  s = _edge_map(512, 2, dtype)
  g = jax.jit(jax.grad(lambda x: ALL_POOLS[name](x).sum()))(s)
  assert g.dtype == dtype
  g = np.asarray(g.astype(jnp.float32))
  assert np.all(np.isfinite(g)) and np.all(g >= 0)


def test_noisy_or_gradient_matches_product_of_others():
  # d NOR / d S_ij = prod_{other} (1 - S); also where another entry is exactly 1 (then 0).
  s = np.array([0.1, 0.5, 0.3, 0.0], np.float32).reshape(2, 2, 1)
  g = np.asarray(jax.grad(lambda x: pooling.noisy_or(x).sum())(s)).ravel()
  one_minus = 1.0 - s.astype(np.float64).ravel()
  expected = [np.prod(np.delete(one_minus, i)) for i in range(4)]
  np.testing.assert_allclose(g, expected, rtol=1e-6)
  s[0, 0, 0] = 1.0
  g = np.asarray(jax.grad(lambda x: pooling.noisy_or(x).sum())(s)).ravel()
  np.testing.assert_allclose(g[1:], 0.0, atol=0)
  assert float(pooling.noisy_or(s)[0]) == 1.0


# ------------------------------------------------------------------------------ jit / vmap


class PoolingVariantsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_lse_lba_matches_oracle_under_variant(self):
    s = _rand_map((32, 16, 3), seed=5)
    beta = jnp.array([-1.0, 0.0, 2.0])
    fn = self.variant(pooling.lse_lba)
    p = fn(s, beta, 5.0)
    chex.assert_shape(p, (3,))
    chex.assert_type(p, jnp.float32)
    chex.assert_tree_all_finite(p)
    np.testing.assert_allclose(
      _np(p), _oracle_lse(s, 5.0 + np.exp(np.array([-1.0, 0, 2]))), atol=1e-5
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_equals_per_example(self):
    s = _rand_map((3, 16, 16, 2), seed=6)
    for name, pool in ALL_POOLS.items():
      batched = self.variant(jax.vmap(pool))(s)
      chex.assert_shape(batched, (3, 2))
      for i in range(3):
        np.testing.assert_allclose(batched[i], pool(s[i]), rtol=1e-6, atol=1e-7, err_msg=name)
    per_beta = self.variant(jax.vmap(pooling.lse_lba, in_axes=(None, 0, None)))
    betas_ = jnp.linspace(-3.0, 3.0, 4)
    out = per_beta(s[0], betas_, 5.0)
    for i, b in enumerate(betas_):
      np.testing.assert_allclose(out[i], pooling.lse_lba(s[0], b, 5.0), rtol=1e-6)


# ------------------------------------------------------------------------------ numerics (Sec 3.4)


def test_naive_forms_underflow_at_512_where_stable_forms_match_float64():
  """The paper's argument for LSE-LBA (Sec 3.4/3.5), asserting both sides."""
  rng = np.random.default_rng(7)
  n = 512
  r = 30.0

  # Generalized mean of small S at large r: S^r underflows to 0 in float32.
  small = jnp.asarray(rng.uniform(1e-4, 1e-2, (n, n, 1)).astype(np.float32))
  naive_gm = jnp.mean(small**r, axis=SPATIAL) ** (1.0 / r)
  assert naive_gm.dtype == jnp.float32
  assert float(naive_gm[0]) == 0.0
  gm64 = _oracle_gm(small, r)
  assert gm64[0] > 1e-3  # the true value is far from 0
  np.testing.assert_allclose(_np(pooling.generalized_mean(small, r)), gm64, rtol=1e-4)
  # LSE-LBA with the same sharpness needs no S^r at all.
  beta = np.log(r - 10.0)
  np.testing.assert_allclose(
    _np(pooling.lse_lba(small, beta, 10.0)), _oracle_lse(small, r), rtol=1e-4
  )

  # Noisy-OR's negative-label term log(1 - NOR): prod(1 - S) underflows, the log is -inf.
  mid = jnp.asarray(rng.uniform(1e-3, 0.5, (n, n, 1)).astype(np.float32))
  naive_nor = 1.0 - jnp.prod(1.0 - mid, axis=SPATIAL)
  naive_log1m = jnp.log(1.0 - naive_nor)
  assert naive_log1m.dtype == jnp.float32
  assert float(naive_log1m[0]) == -np.inf
  log1m64 = np.sum(np.log1p(-np.asarray(mid, np.float64)), axis=SPATIAL)
  assert np.isfinite(log1m64[0])
  np.testing.assert_allclose(_np(pooling.log1m_noisy_or(mid)), log1m64, rtol=1e-4)
  np.testing.assert_allclose(_np(pooling.noisy_or(mid)), -np.expm1(log1m64), rtol=1e-4)
  np.testing.assert_allclose(_np(pooling.lse_lba(mid, 0.0, 5.0)), _oracle_lse(mid, 6.0), rtol=1e-4)

  # Noisy-OR of tiny S: naive 1 - prod(1 - S) rounds to exactly 0 (1 - 1e-9 == 1 in float32).
  tiny = jnp.asarray(rng.uniform(1e-10, 1e-9, (n, n, 1)).astype(np.float32))
  assert float((1.0 - jnp.prod(1.0 - tiny, axis=SPATIAL))[0]) == 0.0
  nor64 = -np.expm1(np.sum(np.log1p(-np.asarray(tiny, np.float64)), axis=SPATIAL))
  assert nor64[0] > 1e-4
  np.testing.assert_allclose(_np(pooling.noisy_or(tiny)), nor64, rtol=1e-4)


# ------------------------------------------------------------------------------ other poolings


@HYP
@given(s=maps, r=st.floats(0.01, 100.0))
def test_lse_between_mean_and_max(s, r):
  p = _np(_lse(s, r))
  s64 = s.astype(np.float64)
  assert np.all(s64.mean(axis=SPATIAL) - TOL <= p) and np.all(p <= s64.max(axis=SPATIAL) + TOL)


@HYP
@given(s=maps, r=st.floats(1.0, 50.0))
def test_generalized_mean_between_mean_and_max_for_r_ge_1(s, r):
  # Power-mean inequality: mean = M_1 <= M_r <= M_inf = max for r >= 1.
  p = _np(_gm(s, r))
  s64 = s.astype(np.float64)
  assert np.all(s64.mean(axis=SPATIAL) * (1 - 1e-5) - TOL <= p)
  assert np.all(p <= s64.max(axis=SPATIAL) * (1 + 1e-5) + TOL)


@HYP
@given(s=maps)
def test_noisy_or_at_least_max_and_in_unit_interval(s):
  p = _np(_nor(s))
  assert np.all(p >= s.astype(np.float64).max(axis=SPATIAL) - TOL)
  assert np.all(p >= 0) and np.all(p <= 1)


@pytest.mark.parametrize("size", [8, 64, 512])
def test_generalized_mean_matches_float64_oracle(size):
  s = _rand_map((size, size, 2), seed=8, low=0.05, high=1.0)
  for r in (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0):
    np.testing.assert_allclose(_np(_gm(s, r)), _oracle_gm(s, r), rtol=1e-5)
  # S = 0 entries count as 0 (the log floor is far below anything that matters).
  s[: size // 2] = 0.0
  np.testing.assert_allclose(
    _np(pooling.generalized_mean(s, 2.0)),
    _oracle_gm(s[size // 2 :], 2.0) * 0.5 ** (1 / 2.0),
    rtol=1e-5,
  )


def test_noisy_or_matches_float64_oracle():
  s = _rand_map((16, 16, 3), seed=9, high=0.05)
  expected = 1.0 - np.prod(1.0 - s.astype(np.float64), axis=SPATIAL)
  np.testing.assert_allclose(_np(pooling.noisy_or(s)), expected, rtol=1e-5)
  np.testing.assert_allclose(_np(pooling.log1m_noisy_or(s)), np.log1p(-expected), rtol=1e-5)


def test_max_and_mean_are_exact():
  s = (np.random.default_rng(10).integers(0, 9, (32, 16, 3)) / 8).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(pooling.max_pool(s)), s.max(axis=SPATIAL))
  # k/8 values sum exactly in float32, so the mean is exact too.
  np.testing.assert_array_equal(
    np.asarray(pooling.mean_pool(s)), s.astype(np.float64).mean(SPATIAL)
  )


@pytest.mark.parametrize("name", sorted(ALL_POOLS))
def test_bfloat16_input_gives_float32_output(name):
  s32 = _rand_map((16, 16, 2), seed=11)
  s16 = jnp.asarray(s32).astype(jnp.bfloat16)
  out = ALL_POOLS[name](s16)
  assert out.dtype == jnp.float32 and out.shape == (2,)
  # Same as pooling the bf16 values upcast to float32.
  np.testing.assert_allclose(out, ALL_POOLS[name](s16.astype(jnp.float32)), rtol=1e-6)


def test_fixed_pool_dispatches_by_name_and_rejects_unknown():
  s = _rand_map((8, 8, 2), seed=12)
  expected = {
    "lse": pooling.lse(s, 3.0),
    "generalized_mean": pooling.generalized_mean(s, 3.0),
    "noisy_or": pooling.noisy_or(s),
    "max": pooling.max_pool(s),
    "mean": pooling.mean_pool(s),
  }
  for kind, want in expected.items():
    pool = pooling.FixedPool(kind, r=3.0)
    variables = pool.init(jax.random.key(0), s)
    assert not jax.tree.leaves(variables)
    np.testing.assert_allclose(pool.apply(variables, s), want, rtol=1e-6)
  with pytest.raises(ValueError, match="unknown pooling"):
    pooling.FixedPool("median").init(jax.random.key(0), s)
  assert set(pooling.POOLINGS) == {"lse_lba", *expected}


# ------------------------------------------------------------------------------ LSELBAPool / beta


@pytest.mark.parametrize("per_class, shape", [(True, (4,)), (False, ())])
def test_lse_lba_pool_module(per_class, shape):
  s = jnp.asarray(_rand_map((2, 16, 16, 4), seed=13))
  pool = pooling.LSELBAPool(r0=5.0, per_class_beta=per_class, beta_init=0.7)
  variables = jax.jit(pool.init)(jax.random.key(0), s)
  beta = variables["params"]["beta"]
  assert beta.shape == shape and beta.dtype == jnp.float32
  np.testing.assert_array_equal(beta, np.full(shape, 0.7, np.float32))
  apply = jax.jit(pool.apply)
  out = apply(variables, s)
  assert out.shape == (2, 4) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _lse_lba(s, 0.7, 5.0), rtol=1e-6)
  # A changed beta is the one used.
  other = jax.tree.map(lambda b: b - 2.0, variables)
  np.testing.assert_allclose(apply(other, s), _lse_lba(s, -1.3, 5.0), rtol=1e-6)
  g = jax.jit(jax.grad(lambda v: pool.apply(v, s).sum()))(variables)["params"]["beta"]
  assert g.shape == shape
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g) > 0)


def test_default_lse_lba_pool_is_per_class_with_beta_zero():
  pool = pooling.LSELBAPool(r0=0.0)
  assert isinstance(pool, nn.Module)
  variables = jax.eval_shape(pool.init, jax.random.key(0), jnp.zeros((8, 8, 3)))
  assert variables["params"]["beta"].shape == (3,)
  assert pool.per_class_beta and pool.beta_init == 0.0


def test_beta_vector_broadcast_matches_scalar_and_per_class_slices():
  s = _rand_map((2, 16, 8, 3), seed=14)
  for r0 in (0.0, 5.0):
    scalar = _lse_lba(s, 0.4, r0)
    np.testing.assert_allclose(_lse_lba(s, jnp.full((3,), 0.4), r0), scalar, rtol=1e-6)
    betas_ = jnp.array([-2.0, 0.0, 2.5])
    vec = _lse_lba(s, betas_, r0)
    for k in range(3):
      np.testing.assert_allclose(
        vec[..., k], _lse_lba(s[..., k : k + 1], betas_[k], r0)[..., 0], rtol=1e-6
      )
    np.testing.assert_allclose(
      pooling.sharpness(betas_, r0), r0 + np.exp(np.asarray(betas_)), rtol=1e-6
    )


@pytest.mark.parametrize("r0", [0.0, 5.0, 10.0])
def test_sharpness_is_lower_bounded_by_r0(r0):
  r = np.asarray(pooling.sharpness(jnp.linspace(-50.0, 5.0, 23), r0))
  assert np.all(r >= r0) and np.all(np.diff(r) >= 0)
