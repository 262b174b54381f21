"""Per-class operating thresholds (lsemil.metrics.operating_points) against brute force and
sklearn's ROC curve."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_curve

from lsemil.core.errors import ConfigError
from lsemil.metrics import operating_points


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  y = (rng.random((300, 3)) < [0.2, 0.5, 0.0]).astype(int)  # the last class has no positive
  p = np.clip(0.3 * y + rng.normal(0.4, 0.2, y.shape), 0, 1).round(2)  # ties
  return p, y


def _brute(p, y, score):
  """The highest candidate threshold with the best score(sens, spec, decisions)."""
  best = None
  for t in sorted(set(p.tolist()), reverse=True):
    d = p >= t
    sens, spec = (d & (y == 1)).sum() / (y == 1).sum(), 1 - (d & (y == 0)).sum() / (y == 0).sum()
    s = score(sens, spec, d)
    if s is not None and (best is None or s > best[0] + 1e-12):
      best = (s, t)
  return None if best is None else best[1]


def test_rules_against_brute_force_and_sklearn(data):
  p, y = data
  got = {r: operating_points.choose(p, y, r)["thresholds"] for r in ("youden", "f1", "sens=0.9")}
  for k in range(2):
    fpr, tpr, thr = roc_curve(y[:, k], p[:, k])
    j = tpr - fpr
    assert got["youden"][k] == pytest.approx(thr[np.flatnonzero(j == j.max())[0]])
    assert got["youden"][k] == _brute(p[:, k], y[:, k], lambda se, sp, d: se + sp - 1)
    f1 = _brute(p[:, k], y[:, k], lambda se, sp, d, k=k: f1_score(y[:, k], d))
    assert got["f1"][k] == f1
    sens = _brute(p[:, k], y[:, k], lambda se, sp, d: sp if se >= 0.9 else None)
    assert got["sens=0.9"][k] == sens
  spec = operating_points.choose(p, y, "spec=0.8")
  assert all(s >= 0.8 for s in spec["specificity"][:2])
  assert spec["thresholds"][2] is None and got["youden"][2] is None  # no positives


def test_rates_and_parse(data):
  p, y = data
  ops = operating_points.choose(p, y, "youden", ["a", "b", "c"])
  r = operating_points.rates(ops["thresholds"], p, y)
  assert r == {k: ops[k] for k in r} and ops["classes"] == ["a", "b", "c"]
  d = p[:, 1] >= ops["thresholds"][1]
  assert r["ppv"][1] == pytest.approx((d & (y[:, 1] == 1)).sum() / d.sum())
  assert r["sensitivity"][2] is None and r["num_positives"][2] == 0
  for bad in ("sens=1.5", "spec", "recall=0.9", "sens=x"):
    with pytest.raises(ConfigError, match=f"--operating-point {bad}: choose youden"):
      operating_points.parse(bad)


def test_patient_bootstrap_of_the_rates(data):
  p, y = data
  patients = np.arange(len(p)) // 3  # three images per patient
  ops = operating_points.choose(p, y, "youden")
  counts = np.random.default_rng(5).multinomial(100, np.full(100, 0.01), size=4)
  sens, spec = operating_points.bootstrap_rates(ops["thresholds"], p, y, patients, counts)
  for b in range(4):  # brute force: each image repeated as often as its patient was drawn
    rep = np.repeat(np.arange(len(p)), counts[b][patients])
    want = operating_points.rates(ops["thresholds"], p[rep], y[rep])
    np.testing.assert_allclose(sens[b, :2], want["sensitivity"][:2])
    np.testing.assert_allclose(spec[b, :2], want["specificity"][:2])
  assert np.isnan(sens[:, 2]).all()  # no threshold for the class without positives
  r = operating_points.rates(ops["thresholds"], p, y, patients, n_boot=200, seed=1)
  for key in ("sensitivity", "specificity"):
    for k in range(2):
      assert r[f"{key}_lo"][k] <= r[key][k] <= r[f"{key}_hi"][k]
      assert r[f"{key}_hi"][k] - r[f"{key}_lo"][k] < 0.3
    assert r[f"{key}_lo"][2] is None
