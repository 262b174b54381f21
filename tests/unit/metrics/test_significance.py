"""lsemil.metrics.significance: DeLong (Sun & Xu 2014) against a hand-computed case, the paired
bootstrap against DeLong, Holm against a hand case, and the bold rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lsemil.core import fileio
from lsemil.metrics import classification, significance

# The hand case: 3 positives and 3 negatives, with ties (positive-negative at 0.6 for run A;
# at 0.5, three ways, for run B).
Y = np.array([1, 1, 1, 0, 0, 0])
A = np.array([0.9, 0.6, 0.4, 0.6, 0.3, 0.2])  # positives X = .9 .6 .4, negatives Y = .6 .3 .2
B = np.array([0.8, 0.5, 0.5, 0.5, 0.7, 0.1])  # positives X = .8 .5 .5, negatives Y = .5 .7 .1

# Derivation (psi(x, y) = 1 if x > y, 1/2 if x = y, 0 otherwise; m = n = 3):
# Run A. V10_i = mean_j psi(X_i, Y_j): .9 -> (1+1+1)/3 = 1; .6 -> (1/2+1+1)/3 = 5/6;
#   .4 -> (0+1+1)/3 = 2/3. AUC = (1 + 5/6 + 2/3)/3 = 5/6.
#   V01_j = mean_i psi(X_i, Y_j): .6 -> (1+1/2+0)/3 = 1/2; .3 -> 1; .2 -> 1 (mean 5/6).
#   S10 = [(1/6)^2 + 0 + (1/6)^2] / 2 = 1/36; S01 = [(1/3)^2 + (1/6)^2 + (1/6)^2] / 2 = 1/12.
#   var = S10/m + S01/n = 1/108 + 3/108 = 1/27.
# Run B. V10: .8 -> 1; .5 -> (1/2+0+1)/3 = 1/2; .5 -> 1/2. AUC = 2/3.
#   V01: .5 -> (1+1/2+1/2)/3 = 2/3; .7 -> (1+0+0)/3 = 1/3; .1 -> 1 (mean 2/3).
#   S10 = [(1/3)^2 + 2 (1/6)^2] / 2 = 1/12; S01 = [0 + 2 (1/3)^2] / 2 = 1/9.
#   var = (1/12 + 1/9)/3 = 7/108.
# Covariances: S10_ab = [(1/6)(1/3) + 0 + (-1/6)(-1/6)] / 2 = (1/18 + 1/36)/2 = 1/24;
#   S01_ab = [(-1/3)(0) + (1/6)(-1/3) + (1/6)(1/3)] / 2 = 0.
# var(A - B) = (1/36 + 1/12 - 2/24)/3 + (1/12 + 1/9 - 0)/3 = (1/36)/3 + (7/36)/3 = 2/27.
# z = (5/6 - 2/3) / sqrt(2/27) = (1/6) sqrt(27/2) = sqrt(3/8);
# p = 2 (1 - Phi(z)) = erfc(z / sqrt 2) = erfc(sqrt(3) / 4) = 0.54029...
HAND = {
  "auc_a": 5 / 6,
  "var_a": 1 / 27,
  "auc_b": 2 / 3,
  "var_b": 7 / 108,
  "var_diff": 2 / 27,
  "z": math.sqrt(3 / 8),
  "p": math.erfc(math.sqrt(3) / 4),
}


def test_delong_hand_case():
  da, db = significance.delong(Y, A), significance.delong(Y, B)
  assert da.auc == pytest.approx(HAND["auc_a"], abs=1e-12)
  assert da.var == pytest.approx(HAND["var_a"], abs=1e-12)
  assert db.auc == pytest.approx(HAND["auc_b"], abs=1e-12)
  assert db.var == pytest.approx(HAND["var_b"], abs=1e-12)
  t = significance.delong_paired(Y, A, B)
  assert t.diff == pytest.approx(1 / 6, abs=1e-12)
  assert t.var == pytest.approx(HAND["var_diff"], abs=1e-12)
  assert t.z == pytest.approx(HAND["z"], abs=1e-12)
  assert t.p == pytest.approx(HAND["p"], abs=1e-12)
  assert HAND["p"] == pytest.approx(0.540291, abs=1e-6)
  # Swapping the runs flips z, not p.
  s = significance.delong_paired(Y, B, A)
  assert s.z == pytest.approx(-HAND["z"]) and s.p == pytest.approx(HAND["p"])


def test_delong_components_hand_case():
  auc, v10, v01 = significance.delong_components(Y, A)
  np.testing.assert_allclose(v10[:3, 0], [1, 5 / 6, 2 / 3])
  np.testing.assert_allclose(v01[3:, 0], [1 / 2, 1, 1])
  assert np.isnan(v10[3:, 0]).all() and np.isnan(v01[:3, 0]).all()
  assert auc[0] == pytest.approx(5 / 6)


def _naive_delong(y, s):
  """O(mn) DeLong from the definition, for cross-checking the mid-rank algorithm."""
  x, z = s[y > 0], s[y == 0]
  psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
  v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
  return psi.mean(), v10.var(ddof=1) / x.size + v01.var(ddof=1) / z.size


def test_delong_vectorised_matches_roc_auc_and_definition():
  rng = np.random.default_rng(3)
  n, k = 300, 14
  y = rng.random((n, k)) < rng.uniform(0.05, 0.5, size=k)
  s = np.round(y * 0.7 + rng.normal(size=(n, k)), 1)  # rounding makes many ties
  d = significance.delong(y, s)
  for j in range(k):
    assert d.auc[j] == pytest.approx(classification.roc_auc(y[:, j], s[:, j]), abs=1e-12)
    auc, var = _naive_delong(y[:, j], s[:, j])
    assert d.auc[j] == pytest.approx(auc, abs=1e-12)
    assert d.var[j] == pytest.approx(var, rel=1e-9)
  np.testing.assert_allclose(d.auc, classification.per_class_auc(y, s), atol=1e-12)


def test_delong_undefined_and_degenerate():
  y = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 0]])
  s = np.arange(12.0).reshape(4, 3)
  d = significance.delong(y, s)
  assert not np.isnan(d.auc[0]) and np.isnan(d.auc[1])  # class 1 has no positives
  assert np.isnan(d.var[1]) and np.isnan(d.var[2])  # class 2 has a single negative
  t = significance.delong_paired(y, s, s)
  assert t.p[0] == 1.0 and t.z[0] == 0.0 and np.isnan(t.p[1])
  # Perfect vs constant scores: no variance, a real difference -> p = 0.
  y1 = np.array([1, 1, 0, 0])
  t = significance.delong_paired(y1, np.array([4.0, 3, 2, 1]), np.zeros(4))
  assert t.diff == 0.5 and t.var == 0 and t.p == 0.0


def test_paired_delong_close_to_paired_bootstrap():
  rng = np.random.default_rng(11)
  n, k = 500, 3
  y = rng.random((n, k)) < 0.3
  common = rng.normal(size=(n, k))
  a = y * 0.9 + common + 0.7 * rng.normal(size=(n, k))
  b = y * np.array([0.8, 0.7, 0.6]) + common + 0.7 * rng.normal(size=(n, k))
  t = significance.delong_paired(y, a, b)
  # One image per patient: the patient bootstrap is the ordinary bootstrap DeLong approximates.
  r = significance.paired_bootstrap_auc(y, a, b, np.arange(n), n_boot=2000, seed=0)
  np.testing.assert_allclose(r.diff, t.diff, atol=1e-12)
  np.testing.assert_allclose(r.se, np.sqrt(t.var), rtol=0.08)
  # p = 0.99, 1e-4 and 0.02: no difference, a clear one and one near the 0.05 line.
  assert t.p[0] > 0.5 and t.p[1] < 1e-3 and 0.01 < t.p[2] < 0.05
  np.testing.assert_allclose(r.p, t.p, atol=0.01)
  assert ((r.lo < t.diff) & (t.diff < r.hi)).all()


def test_paired_bootstrap_auc_resamples_patients():
  # Every patient has two identical images: cluster resampling keeps them together, so the
  # difference's spread is that of the patient-level data, while dropping the pairing of the
  # images (distinct patient per image) shrinks it by about sqrt(2).
  rng = np.random.default_rng(5)
  n = 300
  y = np.repeat(rng.random((n, 1)) < 0.4, 2, axis=0)
  a = np.repeat(y[::2] + rng.normal(size=(n, 1)), 2, axis=0)
  b = np.repeat(0.6 * y[::2] + rng.normal(size=(n, 1)), 2, axis=0)
  clustered = significance.paired_bootstrap_auc(y, a, b, np.repeat(np.arange(n), 2), n_boot=400)
  naive = significance.paired_bootstrap_auc(y, a, b, np.arange(2 * n), n_boot=400)
  assert clustered.se[0] / naive.se[0] == pytest.approx(math.sqrt(2), rel=0.2)


def test_paired_bootstrap_dice():
  rng = np.random.default_rng(2)
  c = 400
  pid = rng.integers(0, 150, size=c)
  cls = np.where(rng.random(c) < 0.5, "Mass", "Nodule")
  base = rng.uniform(0.1, 0.5, size=c)
  da = base + np.where(cls == "Mass", 0.05, 0.0) + 0.02 * rng.normal(size=c)
  db = base + 0.02 * rng.normal(size=c)
  names, r = significance.paired_bootstrap_dice(da, db, pid, cls, n_boot=1000, seed=0)
  assert names == ["Mass", "Nodule"]
  for j, name in enumerate(names):
    m = cls == name
    assert r.diff[j] == pytest.approx(np.mean(da[m] - db[m]), abs=1e-12)
  assert r.p[0] < 0.01 and r.p[1] > 0.05  # a real +0.05 on Mass, nothing on Nodule
  assert r.lo[0] < 0.05 < r.hi[0] and r.lo[1] < 0 < r.hi[1]
  # Identical runs: no difference, p = 1.
  _, same = significance.paired_bootstrap_dice(da, da, pid, cls, n_boot=100)
  assert (same.diff == 0).all() and (same.p == 1).all()
  # A single patient's cases do not vary across resamples.
  _, one = significance.paired_bootstrap_dice(da[:5], db[:5], np.zeros(5), n_boot=50)
  assert one.se[0] == pytest.approx(0, abs=1e-12)


def test_holm_hand_case():
  # sorted: .005 (x4 = .02), .01 (x3 = .03), .03 (x2 = .06), .04 (x1 = .04 -> max .06);
  # NaN is left out of m = 4.
  adj = significance.holm([0.01, 0.04, 0.03, np.nan, 0.005])
  np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, np.nan, 0.02])
  np.testing.assert_allclose(significance.holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
  # Applied to the last axis of a stack of pairs.
  stack = significance.holm(np.array([[0.01, 0.04], [0.2, 0.01]]))
  np.testing.assert_allclose(stack, [[0.02, 0.04], [0.2, 0.02]])


def test_significant_best():
  values = np.array([[0.80, 0.70, 0.60, np.nan], [0.75, 0.71, 0.60, 0.5], [0.70, 0.60, 0.6, 0.4]])
  p = np.full((3, 3, 4), np.nan)

  def setp(i, j, v):
    p[i, j] = p[j, i] = v

  setp(0, 1, [0.001, 0.04, 0.5, np.nan])
  setp(0, 2, [0.002, 0.001, 0.5, np.nan])
  setp(1, 2, [0.3, 0.001, 0.5, 0.001])
  best = significance.significant_best(values, p)
  # Holm within each pair over its defined classes: pair (0, 1) [.001, .04, .5] -> [.003,
  # .08, .5]; pair (0, 2) [.002, .001, .5] -> [.004, .003, .5]; pair (1, 2) [.3, .001, .5,
  # .001] -> [.6, .004, .6, .004]. Class 0: run 0 best, .003 and .004 -> bold. Class 1: run 1
  # best, but .08 vs run 0 -> not. Class 2: a three-way tie -> not. Class 3: run 0 missing,
  # run 1 best, .004 vs run 2 -> bold.
  np.testing.assert_array_equal(
    best, [[True, False, False, False], [False, False, False, True], [False] * 4]
  )
  low = significance.significant_best(values, p, higher_is_better=False)
  assert not low[:, 0].any()  # run 2 lowest, but vs run 1 p = .3


def test_pairwise_delong_symmetric():
  rng = np.random.default_rng(0)
  y = rng.random((100, 2)) < 0.4
  runs = [y + rng.normal(size=(100, 2)) * s for s in (0.5, 1.0, 2.0)]
  p = significance.pairwise_delong(y, runs)
  assert p.shape == (3, 3, 2) and np.isnan(p[np.arange(3), np.arange(3)]).all()
  np.testing.assert_array_equal(p[0, 1], p[1, 0])
  np.testing.assert_allclose(p[0, 2], significance.delong_paired(y, runs[0], runs[2]).p)
  names, pd = significance.pairwise_bootstrap_dice(
    [np.ones(6), np.zeros(6)], np.arange(6), ["Mass"] * 6, n_boot=50
  )
  assert names == ["Mass"] and pd.shape == (2, 2, 1) and pd[0, 1, 0] == pytest.approx(1 / 51)


def test_compare_runs_for_table3():
  rng = np.random.default_rng(4)
  n = 400
  y = rng.random((n, 2)) < 0.3
  noise = rng.normal(size=(3, n, 2))
  # Run "good" separates class 0 far better than the other two; class 1 is the same for all.
  scores = [y * np.array([3.0, 1.0]) + noise[0], y * 1.0 + noise[1], y * 1.0 + noise[2]]
  c = 120
  pid = rng.integers(0, 60, size=c)
  cls = np.where(np.arange(c) < 60, "Atelectasis", "Mass")
  base = rng.uniform(0.1, 0.4, size=c)
  dice = [base + 0.1 * (cls == "Mass") + 0.01 * rng.normal(size=c), base, base + 0.001]
  out = significance.compare_runs(
    ["good", "b", "c"],
    y,
    scores,
    ["Atelectasis", "Mass"],
    dice=dice,
    dice_patients=pid,
    dice_classes=cls,
    n_boot=300,
  )
  assert out["rule"] == significance.BOLD_RULE
  auc = out["auc"]
  assert [(q["a"], q["b"]) for q in auc["pairs"]] == [("good", "b"), ("good", "c"), ("b", "c")]
  t = significance.delong_paired(y, scores[0], scores[1])
  assert auc["pairs"][0]["p"]["Atelectasis"] == pytest.approx(t.p[0])
  assert auc["pairs"][0]["z"]["Mass"] == pytest.approx(t.z[1])
  assert auc["pairs"][0]["p_holm"]["Atelectasis"] == pytest.approx(min(1, 2 * t.p.min()))
  assert auc["bold"] == {"good": ["Atelectasis"], "b": [], "c": []}
  d = out["dice"]
  assert d["bold"] == {"good": ["Mass"], "b": [], "c": []}  # +0.1 on Mass only
  assert d["mean"]["good"]["Mass"] == pytest.approx(np.mean(dice[0][cls == "Mass"]))
  assert d["pairs"][0]["diff"]["Mass"] == pytest.approx(0.1, abs=0.01)
  json.loads(fileio.to_json(out))
