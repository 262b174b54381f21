"""Classification metrics of Yao et al. 2018, Sec 4.2 and Table 3 (host-side numpy, no JAX).

  * `roc_auc` - exact, tie-aware ROC AUC via the Mann-Whitney U statistic with mid-ranks
    (equal to sklearn.metrics.roc_auc_score); NaN when a class lacks positives or negatives.
  * `per_class_auc`, `mean_auc` - the 14 per-class AUCs and their mean over defined classes.
  * `bootstrap_auc_ci` - percentile bootstrap 95% intervals, resampling patients (clusters).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.stats


def roc_auc(y_true, y_score) -> float:
  """Area under the ROC curve, exact with ties (Mann-Whitney U with mid-ranks).

  AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), R_pos the sum of the mid-ranks of
  the positive scores; a positive-negative tie counts 1/2. Returns NaN when y_true has no
  positives or no negatives (AUC undefined).
  """
  y = np.asarray(y_true).ravel() > 0
  s = np.asarray(y_score, dtype=np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"y_true {y.shape} and y_score {s.shape} differ in length")
  n_pos = int(y.sum())
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = scipy.stats.rankdata(s)
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_class_auc(labels, scores) -> np.ndarray:
  """AUC of each column: labels (N, K) binary, scores (N, K) -> (K,) float64, NaN if undefined."""
  y = np.asarray(labels) > 0
  s = np.asarray(scores, dtype=np.float64)
  if y.ndim != 2 or y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal (N, K) arrays")
  n_pos = y.sum(axis=0).astype(np.float64)
  n_neg = y.shape[0] - n_pos
  ranks = scipy.stats.rankdata(s, axis=0)
  r_pos = np.where(y, ranks, 0.0).sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
  auc[(n_pos == 0) | (n_neg == 0)] = np.nan
  return auc


def mean_auc(aucs) -> tuple[float, list[int]]:
  """Mean of the defined (non-NaN) AUCs and the indices of the NaN classes left out.

  The paper's early stopping and Table 3 "A.V.G." row average all 14 classes; a class with no
  positives (or no negatives) in a split has no AUC, so it is reported rather than silently
  averaged as 0.5. Returns (NaN, all indices) when no class is defined.
  """
  a = np.asarray(aucs, dtype=np.float64).ravel()
  missing = np.flatnonzero(np.isnan(a)).tolist()
  if len(missing) == a.size:
    return float("nan"), missing
  return float(np.nanmean(a)), missing


def percentile_interval(boot: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """The (1 - alpha) percentile interval (lo, hi) of each column of bootstrap values (B, M),
  NaN draws left out; NaN where a column has none."""
  lo = np.full(boot.shape[1], np.nan)
  hi = np.full(boot.shape[1], np.nan)
  for m in range(boot.shape[1]):
    b = boot[:, m][~np.isnan(boot[:, m])]
    if b.size:
      lo[m], hi[m] = np.percentile(b, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return lo, hi


def _bootstrap_aucs(labels, scores, patient_ids, counts) -> np.ndarray:
  """AUC of each class under each resample of patients: counts (B, P) -> (B, K).

  counts[b, p] is how many times patient p (in np.unique(patient_ids) order) was drawn in
  resample b; an image's weight is its patient's count. The weighted Mann-Whitney AUC is
  sum_g P_g (N_<g + N_g / 2) / (sum P)(sum N), with g the groups of tied scores in ascending
  order and P_g / N_g the resampled positive / negative weight in group g. Scores are sorted
  once per class; each resample is then a sparse (groups x patients) @ (patients x B) product.
  """
  y = np.asarray(labels) > 0
  s = np.asarray(scores, dtype=np.float64)
  _, pid = np.unique(np.asarray(patient_ids), return_inverse=True)
  pid = pid.ravel()
  counts = np.asarray(counts, dtype=np.float64)
  n_img, n_cls = s.shape
  n_pat = counts.shape[1]
  out = np.empty((counts.shape[0], n_cls))
  for k in range(n_cls):
    # Dense rank = index of the tie group of each image, ascending in score.
    group = scipy.stats.rankdata(s[:, k], method="dense").astype(np.int64) - 1
    n_grp = int(group.max()) + 1 if n_img else 0
    ones = np.ones(n_img)
    pos = scipy.sparse.csr_matrix(
      (ones * y[:, k], (group, pid)), shape=(n_grp, n_pat)
    )  # images of patient p in group g that are positive
    neg = scipy.sparse.csr_matrix((ones * ~y[:, k], (group, pid)), shape=(n_grp, n_pat))
    p_g = np.asarray(pos @ counts.T)  # (G, B)
    n_g = np.asarray(neg @ counts.T)
    n_below = np.cumsum(n_g, axis=0) - n_g
    num = (p_g * (n_below + 0.5 * n_g)).sum(axis=0)
    den = p_g.sum(axis=0) * n_g.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[:, k] = np.where(den > 0, num / den, np.nan)
  return out


def bootstrap_auc_ci(
  labels,
  scores,
  patient_ids,
  *,
  n_boot: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
  chunk: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
  """Percentile bootstrap (1 - alpha) confidence interval of each class's AUC.

  Resamples PATIENTS with replacement (a cluster bootstrap: all images of a drawn patient
  enter with the patient's multiplicity), since images of one patient are correlated and the
  NIH split is by patient (Sec 4.1). labels, scores: (N, K); patient_ids: (N,) any hashable
  dtype. Resamples where a class has no positives or negatives are skipped for that class;
  a class with no defined resample gets NaN bounds. `chunk` resamples are evaluated at once
  (memory ~ 3 * chunk * N floats). Returns (lo, hi), each (K,).
  """
  y = np.asarray(labels)
  s = np.asarray(scores, dtype=np.float64)
  if y.ndim != 2 or y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal (N, K) arrays")
  pids = np.asarray(patient_ids)
  if pids.shape != (y.shape[0],):
    raise ValueError(f"patient_ids {pids.shape} must be ({y.shape[0]},)")
  n_pat = np.unique(pids).size
  rng = np.random.default_rng(seed)
  aucs = []
  for start in range(0, n_boot, chunk):
    b = min(chunk, n_boot - start)
    # Drawing n_pat patients uniformly with replacement = a multinomial count vector.
    counts = rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=b)
    aucs.append(_bootstrap_aucs(y, s, pids, counts))
  aucs = np.concatenate(aucs, axis=0)
  return percentile_interval(aucs, alpha)

