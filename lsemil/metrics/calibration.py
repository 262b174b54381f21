"""Are LSE-LBA's image probabilities calibrated? (Yao et al. 2018, Sec 3.5 claims the pooling
"preserves probabilities".) Host-side numpy / scipy, no JAX.

Measures, per class and overall (pooled over the 14 classes: every (image, class) pair is one
binary prediction):
  * `ece` - expected calibration error over 15 equal-mass bins (Nixon et al. 2019, "Measuring
    calibration in deep learning": equal-count bins, so sparse confidence regions do not get
    empty or tiny bins), binned as sklearn's calibration_curve(strategy='quantile');
  * `brier` - mean squared error of the probability, (p - y)^2;
  * `reliability` - the reliability-diagram data: per bin the mean confidence, the observed
    frequency of positives and the count;
  * `calibration_metrics` - all of them as one JSON-able dict for `evaluate`.

Recalibration, fitted on the validation split and applied to test / predict probabilities:
  * `fit(method, probs, labels)` with method 'temperature' (p' = sigmoid(logit(p) / T), Guo et
    al. 2017) or 'platt' (p' = sigmoid(a logit(p) + b), Platt 1999), one fit per class by
    minimising the binary cross-entropy; returns plain JSON-able parameters.
  * `apply(params, probs)` maps probabilities with fitted parameters.

Both maps are increasing in p (T > 0; a is kept > 0), so per-class AUC is unchanged; only
calibration (ECE, Brier) and thresholded decisions move. Logits are taken of p clipped to
[EPS, 1 - EPS] (float32 probabilities reach exactly 0 and 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from lsemil.core.errors import ConfigError

N_BINS = 15
EPS = 1e-6
METHODS = ("temperature", "platt")
# Search bounds: wide enough for any sane model; they stop a fit on separable validation
# data from running off to infinity.
_LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))
_A_BOUNDS = (1e-3, 1e2)
_B_BOUNDS = (-50.0, 50.0)


def _pairs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
  p = np.asarray(probs, dtype=np.float64)
  y = np.asarray(labels, dtype=np.float64)
  if p.shape != y.shape:
    raise ValueError(f"probs {p.shape} and labels {y.shape} differ")
  if not np.all(np.isfinite(p)):
    raise ValueError(f"{int((~np.isfinite(p)).sum())} non-finite probabilities")
  return p, (y > 0).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Measures


def _named_columns(probs, labels, classes):
  """(p, y, class names) of (N, K) probabilities and labels; ValueError on another shape or a
  wrong number of names (default names class_0 ...)."""
  p, y = _pairs(probs, labels)
  if p.ndim != 2:
    raise ValueError(f"probs must be (N, K), got {p.shape}")
  names = list(classes) if classes is not None else [f"class_{k}" for k in range(p.shape[1])]
  if len(names) != p.shape[1]:
    raise ValueError(f"{len(names)} class names for {p.shape[1]} columns")
  return p, y, names


def bin_index(probs, n_bins: int = N_BINS) -> np.ndarray:
  """Equal-mass bin of each probability of a 1-D vector, as sklearn's
  `calibration_curve(strategy='quantile')` (sklearn/calibration.py): edges
  `np.percentile(p, linspace(0, 1, n_bins + 1) * 100)`, bin = `np.searchsorted(edges[1:-1], p)`
  (an edge value goes to the lower bin).

  Bins hold about N / n_bins predictions each (exactly when the percentiles fall between
  distinct values); tied probabilities always share a bin, so the binning does not depend on
  the input order.
  """
  p = np.asarray(probs, dtype=np.float64).ravel()
  if p.size == 0:
    return np.zeros(0, dtype=np.int64)
  edges = np.percentile(p, np.linspace(0, 1, n_bins + 1) * 100)
  return np.searchsorted(edges[1:-1], p).astype(np.int64)


def reliability(probs, labels, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
  """Reliability-diagram data of one set of binary predictions (any shape, pooled).

  Returns {'confidence': mean p per bin, 'frequency': fraction of positives per bin,
  'count': predictions per bin}, each (n_bins,), ordered by confidence; an empty bin (only
  possible with ties or N < n_bins) has count 0 and NaN means.
  """
  p, y = _pairs(probs, labels)
  p, y = p.ravel(), y.ravel()
  b = bin_index(p, n_bins)
  count = np.bincount(b, minlength=n_bins).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    conf = np.bincount(b, weights=p, minlength=n_bins) / count
    freq = np.bincount(b, weights=y, minlength=n_bins) / count
  return {"confidence": conf, "frequency": freq, "count": count.astype(np.int64)}


def ece(probs, labels, n_bins: int = N_BINS) -> float:
  """Expected calibration error sum_b (n_b / N) |mean p_b - mean y_b|, equal-mass bins.

  probs, labels: any equal shapes, pooled (pass a column for one class). 0 for perfectly
  calibrated bins; NaN for no predictions.
  """
  r = reliability(probs, labels, n_bins)
  n = r["count"].sum()
  if n == 0:
    return float("nan")
  used = r["count"] > 0
  gap = np.abs(r["confidence"][used] - r["frequency"][used])
  return float((r["count"][used] * gap).sum() / n)


def brier(probs, labels) -> float:
  """Brier score mean (p - y)^2 over all predictions given (pooled); NaN for none."""
  p, y = _pairs(probs, labels)
  return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def calibration_metrics(
  probs, labels, classes: Sequence[str] | None = None, n_bins: int = N_BINS
) -> dict:
  """ECE and Brier per class and overall, plus the pooled reliability data; JSON-able.

  probs, labels: (N, K); classes: K names (default 'class_<k>'). Returns
  {'ece': {class: v}, 'ece_overall': v, 'brier': {class: v}, 'brier_overall': v,
   'reliability': {'confidence', 'frequency', 'count': lists of n_bins}, 'n_bins': n_bins};
  overall values pool every (image, class) prediction into one set (not a mean of classes).
  """
  p, y, names = _named_columns(probs, labels, classes)
  rel = reliability(p, y, n_bins)
  return {
    "ece": {c: ece(p[:, k], y[:, k], n_bins) for k, c in enumerate(names)},
    "ece_overall": ece(p, y, n_bins),
    "brier": {c: brier(p[:, k], y[:, k]) for k, c in enumerate(names)},
    "brier_overall": brier(p, y),
    "reliability": {k: v.tolist() for k, v in rel.items()},
    "n_bins": int(n_bins),
  }


# ----------------------------------------------------------------------------------------------
# Recalibration


def logit(probs) -> np.ndarray:
  """log(p / (1 - p)) of p clipped to [EPS, 1 - EPS]."""
  p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1.0 - EPS)
  return np.log(p) - np.log1p(-p)


def _nll_ab(theta, z, y):
  """Mean BCE of sigmoid(a z + b) and its gradient in (a, b)."""
  a, b = theta
  t = a * z + b
  # BCE = log(1 + e^t) - y t, stable via logaddexp; d/dt = sigmoid(t) - y.
  loss = np.mean(np.logaddexp(0.0, t) - y * t)
  g = scipy.special.expit(t) - y
  return loss, np.array([np.mean(g * z), np.mean(g)])


def _nll_log_t(theta, z, y):
  """Mean BCE of sigmoid(z / T), T = exp(theta), and its gradient in theta."""
  s = np.exp(-theta[0])  # 1 / T
  loss, g = _nll_ab(np.array([s, 0.0]), z, y)
  return loss, np.array([-s * g[0]])  # d s / d theta = -s


def _defined(y: np.ndarray) -> bool:
  return 0 < y.sum() < y.size


def fit_temperature(probs, labels) -> list[float]:
  """Per-class temperature T_k minimising the validation BCE of sigmoid(logit(p) / T_k).

  probs, labels: (N, K). A class without both positives and negatives keeps T = 1 (identity).
  """
  p, y = _pairs(probs, labels)
  z = logit(p)
  out = []
  for k in range(p.shape[1]):
    if not _defined(y[:, k]):
      out.append(1.0)
      continue
    res = scipy.optimize.minimize(
      _nll_log_t,
      [0.0],
      args=(z[:, k], y[:, k]),
      jac=True,
      method="L-BFGS-B",
      bounds=[_LOG_T_BOUNDS],
    )
    out.append(float(np.exp(res.x[0])))
  return out


def fit_platt(probs, labels) -> tuple[list[float], list[float]]:
  """Per-class (a_k, b_k) minimising the validation BCE of sigmoid(a_k logit(p) + b_k).

  a is bounded to [1e-3, 100] (kept increasing, so the AUC does not change), b to [-50, 50].
  A class without both positives and negatives keeps a = 1, b = 0 (identity).
  """
  p, y = _pairs(probs, labels)
  z = logit(p)
  a_out, b_out = [], []
  for k in range(p.shape[1]):
    if not _defined(y[:, k]):
      a_out.append(1.0)
      b_out.append(0.0)
      continue
    res = scipy.optimize.minimize(
      _nll_ab,
      [1.0, 0.0],
      args=(z[:, k], y[:, k]),
      jac=True,
      method="L-BFGS-B",
      bounds=[_A_BOUNDS, _B_BOUNDS],
    )
    a_out.append(float(res.x[0]))
    b_out.append(float(res.x[1]))
  return a_out, b_out


def fit(method: str, probs, labels, classes: Sequence[str] | None = None) -> dict:
  """Fits a recalibration on validation (N, K) probabilities and labels; JSON-able params.

  Returns {'method': 'temperature', 'classes': [...], 'temperature': [K floats]} or
  {'method': 'platt', 'classes': [...], 'a': [K], 'b': [K]}, plus 'num_images' (N) and
  'num_positives' ([K]) of the fit. Store it (e.g. fileio.write_json) and `apply` it later.
  """
  p, y, names = _named_columns(probs, labels, classes)
  out: dict = {"method": method, "classes": names}
  if method == "temperature":
    out["temperature"] = fit_temperature(p, y)
  elif method == "platt":
    out["a"], out["b"] = fit_platt(p, y)
  else:
    raise ConfigError(f"calibration method must be one of {METHODS}, got {method!r}")
  out["num_images"] = int(p.shape[0])
  out["num_positives"] = [int(v) for v in y.sum(axis=0)]
  return out


def _param(params: Mapping, key: str, k: int) -> np.ndarray:
  v = params.get(key)
  if v is None or len(v) != k:
    raise ConfigError(f"calibration parameters: {key!r} must list {k} values, got {v!r}")
  return np.asarray(v, dtype=np.float64)


def apply(params: Mapping, probs) -> np.ndarray:
  """Maps probabilities (..., K) with parameters from `fit` (or their JSON round trip).

  'temperature': sigmoid(logit(p) / T_k); 'platt': sigmoid(a_k logit(p) + b_k), per column
  k. Returns float64 of the same shape. Raises ConfigError for parameters that do not fit.
  """
  p = np.asarray(probs, dtype=np.float64)
  method = params.get("method") if isinstance(params, Mapping) else None
  k = p.shape[-1] if p.ndim else 0
  z = logit(p)
  if method == "temperature":
    t = _param(params, "temperature", k)
    if not (t > 0).all():
      raise ConfigError(f"calibration parameters: temperatures must be > 0, got {t.tolist()}")
    return scipy.special.expit(z / t)
  if method == "platt":
    return scipy.special.expit(_param(params, "a", k) * z + _param(params, "b", k))
  raise ConfigError(f"calibration parameters: 'method' must be one of {METHODS}, got {method!r}")
