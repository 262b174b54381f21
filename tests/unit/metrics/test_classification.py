"""Tests of lsemil.metrics.classification: ROC AUC, per-class and mean AUC and the patient
bootstrap, with sklearn as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lsemil.metrics import classification

# ------------------------------------------------------------------------------ AUC


def test_roc_auc_hand_case_with_tie():
  # pos scores {0.8, 0.4}, neg {0.4, 0.1}: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4 -> 1/2, 0.4>0.1)
  assert classification.roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(
    3.5 / 4, abs=1e-12
  )
  assert classification.roc_auc([0, 1], [0.3, 0.3]) == 0.5
  assert classification.roc_auc([1, 0], [0.1, 0.9]) == 0.0


@pytest.mark.parametrize("levels", [None, 3, 10])
def test_roc_auc_matches_sklearn_including_heavy_ties(levels):
  rng = np.random.default_rng(levels or 1)
  for _ in range(20):
    n = int(rng.integers(5, 300))
    y = rng.random(n) < rng.uniform(0.05, 0.9)
    if y.all() or not y.any():
      continue
    s = rng.random(n) + 0.3 * y
    if levels is not None:
      s = np.floor(s * levels)  # only a handful of distinct values
    assert abs(classification.roc_auc(y, s) - roc_auc_score(y, s)) < 1e-9


def test_roc_auc_undefined_is_nan():
  assert np.isnan(classification.roc_auc([0, 0, 0], [0.1, 0.2, 0.3]))
  assert np.isnan(classification.roc_auc([1, 1], [0.1, 0.2]))


def test_per_class_auc_matches_columnwise_and_marks_nan():
  rng = np.random.default_rng(0)
  y = (rng.random((200, 5)) < 0.3).astype(int)
  y[:, 3] = 0  # no positives
  s = np.round(rng.random((200, 5)) + 0.2 * y, 1)
  aucs = classification.per_class_auc(y, s)
  assert aucs.shape == (5,)
  for k in (0, 1, 2, 4):
    assert abs(aucs[k] - roc_auc_score(y[:, k], s[:, k])) < 1e-9
  assert np.isnan(aucs[3])


def test_mean_auc_skips_and_reports_nan_classes():
  mean, missing = classification.mean_auc([0.6, np.nan, 0.8, np.nan])
  assert mean == pytest.approx(0.7)
  assert missing == [1, 3]
  mean, missing = classification.mean_auc([np.nan])
  assert np.isnan(mean) and missing == [0]


def test_bootstrap_resample_aucs_equal_weighted_sklearn():
  # Each resample's AUC = the AUC of images weighted by their patient's draw count.
  rng = np.random.default_rng(3)
  n, k = 60, 3
  pids = rng.integers(0, 20, n)
  y = (rng.random((n, k)) < 0.4).astype(int)
  s = np.floor((rng.random((n, k)) + 0.3 * y) * 5)  # ties
  uniq, inv = np.unique(pids, return_inverse=True)
  counts = rng.multinomial(uniq.size, np.full(uniq.size, 1 / uniq.size), size=8)
  aucs = classification._bootstrap_aucs(y, s, pids, counts)
  for b in range(8):
    w = counts[b][inv]
    for c in range(k):
      yc, keep = y[:, c], w > 0
      if len(set(yc[keep])) < 2:
        assert np.isnan(aucs[b, c])
      else:
        ref = roc_auc_score(yc[keep], s[keep, c], sample_weight=w[keep])
        assert abs(aucs[b, c] - ref) < 1e-9


def test_bootstrap_resamples_patients_not_images():
  # Duplicating every image under its own patient id must not narrow the interval: the cluster
  # bootstrap of the duplicated set equals that of the original (same seed, same patients).
  rng = np.random.default_rng(1)
  n = 80
  y = (rng.random((n, 2)) < 0.4).astype(int)
  s = rng.random((n, 2)) + 0.5 * y
  pids = np.arange(n)
  lo1, hi1 = classification.bootstrap_auc_ci(y, s, pids, n_boot=200, seed=7)
  lo2, hi2 = classification.bootstrap_auc_ci(
    np.repeat(y, 3, axis=0), np.repeat(s, 3, axis=0), np.repeat(pids, 3), n_boot=200, seed=7
  )
  np.testing.assert_allclose(lo1, lo2, atol=1e-12)
  np.testing.assert_allclose(hi1, hi2, atol=1e-12)
  # An image-level bootstrap of the tripled data would be about sqrt(3) narrower: check we are
  # not that, and that the interval brackets the point estimate.
  point = classification.per_class_auc(y, s)
  assert np.all(lo1 <= point) and np.all(point <= hi1) and np.all(hi1 - lo1 > 0.02)


def test_bootstrap_ci_reproducible_and_nan_for_undefined_class():
  rng = np.random.default_rng(2)
  y = (rng.random((50, 2)) < 0.5).astype(int)
  y[:, 1] = 0
  s = rng.random((50, 2))
  pids = np.repeat(np.arange(25), 2)
  a = classification.bootstrap_auc_ci(y, s, pids, n_boot=50, seed=3, chunk=7)
  b = classification.bootstrap_auc_ci(y, s, pids, n_boot=50, seed=3)
  np.testing.assert_array_equal(a[0], b[0])  # chunking does not change the draws' results
  assert np.isnan(a[0][1]) and np.isnan(a[1][1])
  assert a[0][0] < a[1][0]
