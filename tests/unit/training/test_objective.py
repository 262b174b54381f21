"""Tests of lsemil.training.objective (Sec 3.6, 4.2): the binary cross-entropy and the
paper's optimizer."""

from __future__ import annotations

import functools
import math

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


def test_masked_bce_is_the_mean_over_known_labels_of_each_class_summed():
  masked = jax.jit(objective.masked_binary_cross_entropy)
  nan = np.nan
  p = np.array([[0.9, 0.2, 0.6], [0.3, 0.7, 0.5], [0.4, 0.1, 0.8], [0.5, 0.5, 0.5]], np.float32)
  # Class 2 is unknown on every image; the last image has no known label at all.
  y = np.array([[1, 0, nan], [0, nan, nan], [nan, 1, nan], [nan, nan, nan]], np.float32)
  ln = math.log
  class0 = (-ln(0.9) - ln(1 - 0.3)) / 2  # images 0 and 1
  class1 = (-ln(1 - 0.2) - ln(0.1)) / 2  # images 0 and 2
  want = class0 + class1  # class 2 adds nothing; image 3 counts nowhere
  got = masked(jnp.asarray(p), jnp.asarray(y))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  g = jax.grad(lambda q: masked(q, y))(jnp.asarray(p))
  assert np.all(np.isfinite(g))
  assert np.all(np.asarray(g)[np.isnan(y)] == 0)  # unknown labels pull nothing
  # Padding (mask 0) is left out like an unknown row; without NaN it is the paper's cost.
  mask = np.array([1, 1, 1, 0], np.float32)
  p2 = p.copy()
  p2[3] = 0.999
  y2 = np.where(np.isnan(y), 0.0, y).astype(np.float32)
  y2[:3, 2] = nan
  y2[3] = 0.0
  got2 = masked(jnp.asarray(p2), jnp.asarray(y2), mask)
  want2 = (-ln(0.9) - ln(0.7) - ln(0.6)) / 3 + (-ln(0.8) - ln(0.3) - ln(0.1)) / 3
  np.testing.assert_allclose(float(got2), want2, rtol=1e-6)
  full = (np.random.default_rng(7).random((5, 3)) < 0.5).astype(np.float32)
  q = np.repeat(p[:1], 5, axis=0)
  np.testing.assert_allclose(float(masked(q, full)),
                             float(jax.jit(objective.binary_cross_entropy)(q, full)), rtol=1e-6)


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
