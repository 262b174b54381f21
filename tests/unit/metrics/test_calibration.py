"""lsemil.metrics.calibration: ECE / Brier / reliability on hand cases, temperature and Platt fits
recovering planted parameters, JSON round trip of the fitted parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn.calibration

from lsemil.core import fileio
from lsemil.core.errors import ConfigError
from lsemil.metrics import calibration, classification


def test_equal_mass_bins():
  b = calibration.bin_index(np.linspace(0, 1, 30), n_bins=15)
  np.testing.assert_array_equal(np.bincount(b), [2] * 15)
  # Order does not matter, and ties share a bin (five 0.5's: mid-rank 3 of 10 -> bin 1 of 5).
  p = np.array([0.9, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.8, 0.95])
  b = calibration.bin_index(p, n_bins=5)
  assert len(set(b[p == 0.5].tolist())) == 1
  perm = np.random.default_rng(0).permutation(p.size)
  np.testing.assert_array_equal(calibration.bin_index(p[perm], 5), b[perm])


def test_bins_are_sklearn_quantile_calibration_curve():
  # Every N from 16 to 60 (not only multiples of 15), with ties: the reliability data of the
  # non-empty bins is sklearn's calibration_curve(strategy='quantile'), ECE its weighted gap.
  rng = np.random.default_rng(2)
  for n in range(16, 61):
    p = rng.random(n)
    if n % 3 == 0:
      p = np.round(p, 1)  # ties, and bins left empty
    y = rng.random(n) < p
    true, pred = sklearn.calibration.calibration_curve(y, p, n_bins=15, strategy="quantile")
    r = calibration.reliability(p, y)
    used = r["count"] > 0
    np.testing.assert_allclose(r["confidence"][used], pred, rtol=0, atol=1e-12, err_msg=str(n))
    np.testing.assert_allclose(r["frequency"][used], true, rtol=0, atol=1e-12, err_msg=str(n))
    edges = np.percentile(p, np.linspace(0, 1, 16) * 100)  # sklearn's expression
    count = np.bincount(np.searchsorted(edges[1:-1], p), minlength=15)[used]
    want = (count * np.abs(pred - true)).sum() / n
    assert calibration.ece(p, y) == pytest.approx(want, abs=1e-12), n


def test_non_finite_probability_is_an_error():
  with pytest.raises(ValueError, match="non-finite"):
    calibration.ece(np.array([0.2, np.nan, 0.4]), np.array([0, 1, 0]))


def test_perfectly_calibrated_has_zero_ece():
  # 15 groups of 15 predictions: group k says p = k / 15 and has exactly k positives. The
  # 15 equal-mass bins of the 225 predictions are exactly the groups (mid-rank 15k + 8).
  p = np.repeat(np.arange(15) / 15.0, 15)
  y = np.concatenate([np.r_[np.ones(k), np.zeros(15 - k)] for k in range(15)])
  assert calibration.ece(p, y) == pytest.approx(0.0, abs=1e-12)
  r = calibration.reliability(p, y)
  np.testing.assert_allclose(r["confidence"], r["frequency"])
  np.testing.assert_array_equal(r["count"], [15] * 15)


def test_known_miscalibration():
  # Always says 0.9, true frequency 0.6: one bin (all tied), ECE = |0.9 - 0.6| = 0.3.
  y = np.r_[np.ones(60), np.zeros(40)]
  p = np.full(100, 0.9)
  assert calibration.ece(p, y) == pytest.approx(0.3)
  # Brier = 0.6 (0.1)^2 + 0.4 (0.9)^2 = 0.006 + 0.324 = 0.33.
  assert calibration.brier(p, y) == pytest.approx(0.33)
  # Two bins by hand: p = .2 x 50 (30 positive) and p = .8 x 50 (25 positive):
  # ECE = .5 |.2 - .6| + .5 |.8 - .5| = .2 + .15 = .35.
  p2 = np.r_[np.full(50, 0.2), np.full(50, 0.8)]
  y2 = np.r_[np.ones(30), np.zeros(20), np.ones(25), np.zeros(25)]
  assert calibration.ece(p2, y2, n_bins=2) == pytest.approx(0.35)
  assert calibration.ece(p2, y2) == pytest.approx(0.35)  # 15 bins: ties keep the two groups whole


def test_calibration_metrics_per_class_and_pooled():
  rng = np.random.default_rng(1)
  p = rng.random((3000, 3))
  y = rng.random((3000, 3)) < p  # calibrated in expectation
  y[:, 2] = rng.random(3000) < 0.5 * p[:, 2]  # class 2 over-confident
  m = calibration.calibration_metrics(p, y, ["a", "b", "c"])
  assert set(m["ece"]) == {"a", "b", "c"}
  for k, c in enumerate("abc"):
    assert m["ece"][c] == pytest.approx(calibration.ece(p[:, k], y[:, k]))
    assert m["brier"][c] == pytest.approx(np.mean((p[:, k] - y[:, k]) ** 2))
  assert m["ece"]["c"] > 3 * max(m["ece"]["a"], m["ece"]["b"])
  assert m["ece_overall"] == pytest.approx(calibration.ece(p.ravel(), y.ravel()))
  assert m["brier_overall"] == pytest.approx(np.mean(list(m["brier"].values())))
  assert sum(m["reliability"]["count"]) == 9000 and m["n_bins"] == 15
  json.loads(fileio.to_json(m))  # JSON-able


def _planted(rng, n, k, true_logit):
  z = rng.normal(0.0, 2.5, size=(n, k))
  y = rng.random((n, k)) < 1.0 / (1.0 + np.exp(-true_logit(z)))
  return 1.0 / (1.0 + np.exp(-z)), y


def test_temperature_recovers_planted_temperature():
  rng = np.random.default_rng(0)
  t0 = np.array([2.0, 0.5, 1.0])
  p, y = _planted(rng, 20000, 3, lambda z: z / t0)
  params = calibration.fit("temperature", p, y, ["a", "b", "c"])
  np.testing.assert_allclose(params["temperature"], t0, rtol=0.05)
  q = calibration.apply(params, p)
  before = calibration.calibration_metrics(p, y)["ece"]
  after = calibration.calibration_metrics(q, y)["ece"]
  assert after["class_0"] < before["class_0"] / 5 and after["class_1"] < before["class_1"] / 5
  np.testing.assert_allclose(classification.per_class_auc(y, q), classification.per_class_auc(y, p))


def test_platt_recovers_planted_a_b():
  rng = np.random.default_rng(1)
  a0, b0 = np.array([0.7, 1.5]), np.array([-1.0, 0.5])
  p, y = _planted(rng, 20000, 2, lambda z: a0 * z + b0)
  params = calibration.fit("platt", p, y)
  np.testing.assert_allclose(params["a"], a0, atol=0.08)
  np.testing.assert_allclose(params["b"], b0, atol=0.08)
  # apply = sigmoid(a logit(p) + b), checked at one point by hand.
  one = calibration.apply({"method": "platt", "a": [2.0], "b": [1.0]}, np.array([[0.5], [0.75]]))
  np.testing.assert_allclose(
    one[:, 0], [1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-(2 * np.log(3) + 1)))]
  )


def test_params_json_round_trip_and_identity_for_undefined_class():
  rng = np.random.default_rng(2)
  p = rng.random((200, 2))
  y = np.c_[rng.random(200) < p[:, 0], np.zeros(200)]  # class 1: no positives
  for method in calibration.METHODS:
    params = calibration.fit(method, p, y, ["x", "y"])
    back = json.loads(fileio.to_json(params))
    np.testing.assert_allclose(calibration.apply(back, p), calibration.apply(params, p))
    np.testing.assert_allclose(calibration.apply(back, p)[:, 1], p[:, 1], atol=1e-9)  # identity
    assert back["num_positives"][1] == 0 and back["classes"] == ["x", "y"]
  # 0 and 1 are clipped, not infinite.
  q = calibration.apply({"method": "temperature", "temperature": [2.0]}, np.array([[0.0], [1.0]]))
  assert np.isfinite(q).all() and 0 < q[0, 0] < 0.01 and 0.99 < q[1, 0] < 1


def test_bad_params_are_config_errors():
  p = np.full((3, 2), 0.5)
  with pytest.raises(ConfigError, match="method"):
    calibration.apply({"method": "isotonic"}, p)
  with pytest.raises(ConfigError, match="temperature"):
    calibration.apply({"method": "temperature", "temperature": [1.0]}, p)
  with pytest.raises(ConfigError, match="> 0"):
    calibration.apply({"method": "temperature", "temperature": [1.0, -1.0]}, p)
  with pytest.raises(ConfigError, match="method"):
    calibration.fit("isotonic", p, p > 0.4)
