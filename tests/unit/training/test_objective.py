"""Tests of lsemil.training.objective (Sec 3.6, 4.2): the binary cross-entropy and the
paper's optimizer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lsemil.training import objective

# ------------------------------------------------------------------------------ losses


def _np_bce(p, y):
  p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
  return -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p), axis=-1)


def test_bce_matches_float64_numpy():
  rng = np.random.default_rng(5)
  p = rng.uniform(0.01, 0.99, (16, 14)).astype(np.float32)
  y = (rng.random((16, 14)) < 0.3).astype(np.float32)
  got = float(objective.binary_cross_entropy(jnp.asarray(p), jnp.asarray(y)))
  np.testing.assert_allclose(got, _np_bce(p, y).mean(), rtol=1e-5)
  assert float(objective.binary_cross_entropy(jnp.asarray(p).astype(jnp.bfloat16), y)) > 0


def test_bce_finite_at_probs_exactly_0_and_1():
  p = jnp.array([[0.0, 1.0, 0.0, 1.0]])
  y = jnp.array([[0.0, 1.0, 1.0, 0.0]])
  loss = float(objective.binary_cross_entropy(p, y))
  assert np.isfinite(loss)
  # Two right (~0 each), two confidently wrong: p clipped to eps and to float32(1 - eps).
  eps = objective.PROB_EPS
  wrong = -np.log(eps) - np.log1p(-np.float64(np.float32(1 - eps)))
  np.testing.assert_allclose(loss, wrong, rtol=1e-4)
  g = jax.grad(lambda q: objective.binary_cross_entropy(q, y))(p)
  assert np.all(np.isfinite(g))


def test_bce_mask_excludes_padded_rows():
  rng = np.random.default_rng(6)
  p = rng.uniform(0.05, 0.95, (6, 4)).astype(np.float32)
  y = (rng.random((6, 4)) < 0.5).astype(np.float32)
  mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
  got = float(objective.binary_cross_entropy(p, y, mask))
  np.testing.assert_allclose(got, _np_bce(p[:4], y[:4]).mean(), rtol=1e-5)
  p2, y2 = p.copy(), y.copy()
  p2[4:], y2[4:] = 0.999, 0.0  # padded rows changed to a huge loss: no effect
  assert float(objective.binary_cross_entropy(p2, y2, mask)) == pytest.approx(got, rel=1e-6)
  assert float(objective.binary_cross_entropy(p2, y2)) > got + 0.5  # they would count unmasked
  assert float(objective.binary_cross_entropy(p, y, np.zeros(6, np.float32))) == 0.0


def test_paper_optimizer_applies_coupled_weight_decay():
  lr, wd = 1e-3, 1e-5
  params = {"w": jnp.array([2.0, -3.0, 0.5, -0.1, 0.0]), "beta": jnp.array([0.7, -0.2])}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = objective.paper_optimizer(lr, wd)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero loss gradient: the update is Adam applied to the L2 gradient wd * w ...
  adam = optax.adam(lr)
  decay_grads = jax.tree.map(lambda w: wd * w, params)
  want, _ = adam.update(decay_grads, adam.init(params), params)
  chex_close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-12)
  jax.tree.map(chex_close, updates, want)
  # ... which on the first step is ~ -lr * sign(w): every param moves toward 0 by ~lr.
  for key in params:
    w, u = np.asarray(params[key]), np.asarray(updates[key])
    np.testing.assert_allclose(u, -lr * np.sign(w), rtol=2e-2)
    assert np.all(np.abs(w + u) <= np.abs(w))
  # Decoupled decay (AdamW) would move w by only lr * wd * w: ~1e3 times less.
  adamw = optax.adamw(lr, weight_decay=wd)
  decoupled, _ = adamw.update(zeros, adamw.init(params), params)
  assert float(jnp.max(jnp.abs(decoupled["w"]))) < 1e-3 * float(jnp.max(jnp.abs(updates["w"])))
  # With a loss gradient g the decay is added before the moments: Adam(g + wd * w).
  g = jax.tree.map(lambda w: 0.01 * jnp.cos(w), params)
  updates, _ = tx.update(g, tx.init(params), params)
  want, _ = adam.update(jax.tree.map(lambda a, w: a + wd * w, g, params), adam.init(params))
  jax.tree.map(chex_close, updates, want)
