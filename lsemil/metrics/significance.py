"""Significance of differences between runs, for Table 3's bold (Yao et al. 2018, Sec 4.3).

The paper bolds "maxima other than statistical significance"; these functions give the tests
behind a bold that means "significantly best" instead. Host-side numpy and scipy, no JAX.

AUC (same test images, two runs):
  * `delong_components`, `delong` - the fast DeLong algorithm of Sun & Xu 2014 ("Fast
    implementation of DeLong's algorithm for comparing the areas under correlated receiver
    operating characteristic curves", IEEE SPL 21(11)): the AUC and its variance from the
    structural components, obtained from mid-ranks in O(N log N), vectorised over classes.
  * `delong_paired` - the paired DeLong test of AUC_a = AUC_b: z and the two-sided p.
  * `paired_bootstrap_auc` - the same difference by a paired PATIENT bootstrap (one set of
    resampled patients for both runs), a check on DeLong that also respects that images of one
    patient are correlated (DeLong treats images as independent).

DICE (same box cases, two runs):
  * `paired_bootstrap_dice` - paired patient bootstrap of the difference of mean DICE per
    class, from per-case DICE arrays with the cases' patient ids and classes.

Multiplicity and bold:
  * `holm` - Holm's step-down adjusted p-values over classes.
  * `pairwise_delong`, `pairwise_bootstrap_dice` - raw p-values of every pair of runs.
  * `significant_best` - which run's per-class value is significantly best, for bold;
    `BOLD_RULE` states the rule in words for under a table.
  * `compare_runs` - all of the above for Table 3 in one JSON-able dict (pairs, p, Holm p,
    bold cells, for AUC and DICE).

A two-sided p is NaN wherever the test is undefined (a class with fewer than 2 positives or
negatives for DeLong, no cases for DICE); NaN p-values never count as significant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats

from lsemil.metrics import classification

ALPHA = 0.05
BOLD_RULE = (
  "Bold: the best of our runs in that row, only where it is better than every other run of "
  "ours at p < 0.05 after a Holm correction over classes (AUC: paired DeLong test on the "
  "same test images; DICE: paired patient bootstrap on the same box cases). p-values are in "
  "the CSV."
)


# ----------------------------------------------------------------------------------------------
# DeLong (Sun & Xu 2014)


def _as_2d(labels, scores) -> tuple[np.ndarray, np.ndarray, bool]:
  y = np.asarray(labels)
  s = np.asarray(scores, dtype=np.float64)
  one = y.ndim == 1
  if one:
    y, s = y[:, None], s[:, None] if s.ndim == 1 else s
  if y.ndim != 2 or y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal (N,) or (N, K)")
  if not np.isfinite(s).all():
    raise ValueError("scores must be finite")
  return y > 0, s, one


def delong_components(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """AUC and the DeLong structural components of each column, from mid-ranks.

  With m positives X_i and n negatives Y_j of a class, psi(x, y) = 1 if x > y, 1/2 if x = y,
  0 otherwise, the components are V10_i = (1/n) sum_j psi(X_i, Y_j) (one per positive) and
  V01_j = (1/m) sum_i psi(X_i, Y_j) (one per negative); AUC = mean(V10) = mean(V01). Sun & Xu
  (2014, Sec III) get them from three mid-rankings: Tz over all N scores, Tx among positives,
  Ty among negatives: V10_i = (Tz_i - Tx_i) / n and V01_j = 1 - (Tz_j - Ty_j) / m.

  labels, scores: (N, K) (or (N,)). Returns (auc (K,), v10 (N, K) NaN on negatives,
  v01 (N, K) NaN on positives); auc is NaN for a class without positives or negatives.
  """
  y, s, _ = _as_2d(labels, scores)
  m = y.sum(axis=0).astype(np.float64)
  n = y.shape[0] - m
  tz = scipy.stats.rankdata(s, axis=0)
  # Ranking with the other group set to +inf leaves the ranks within a group exact.
  tx = scipy.stats.rankdata(np.where(y, s, np.inf), axis=0)
  ty = scipy.stats.rankdata(np.where(~y, s, np.inf), axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    v10 = np.where(y, (tz - tx) / n, np.nan)
    v01 = np.where(~y, 1.0 - (tz - ty) / m, np.nan)
    auc = np.nansum(v10, axis=0) / m
  auc[(m == 0) | (n == 0)] = np.nan
  return auc, v10, v01


def _cov(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-column sample covariance (ddof 1) of a and b over the rows where mask is True."""
  k = mask.sum(axis=0).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    ma = np.where(mask, a, 0.0).sum(axis=0) / k
    mb = np.where(mask, b, 0.0).sum(axis=0) / k
    prod = np.where(mask, (a - ma) * (b - mb), 0.0).sum(axis=0)
    return np.where(k > 1, prod / (k - 1), np.nan)


class DeLong(NamedTuple):
  auc: np.ndarray  # (K,) or a 0-d array for 1-D input
  var: np.ndarray  # DeLong variance of the AUC estimate


def delong(labels, scores) -> DeLong:
  """AUC and its DeLong variance var = S10 / m + S01 / n per column (Sun & Xu 2014, Eq. 2).

  S10, S01: sample variances (ddof 1) of the structural components V10 over positives and
  V01 over negatives (`delong_components`). The AUC equals `classification.roc_auc`. var is NaN
  where a class has fewer than 2 positives or 2 negatives. 1-D input gives 0-d arrays.
  """
  y, s, one = _as_2d(labels, scores)
  auc, v10, v01 = delong_components(y, s)
  m, n = y.sum(axis=0), (~y).sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    var = _cov(v10, v10, y) / m + _cov(v01, v01, ~y) / n
  if one:
    return DeLong(auc[0], var[0])
  return DeLong(auc, var)


class PairedTest(NamedTuple):
  auc_a: np.ndarray  # (K,)
  auc_b: np.ndarray
  diff: np.ndarray  # auc_a - auc_b
  var: np.ndarray  # DeLong variance of the difference
  z: np.ndarray  # diff / sqrt(var)
  p: np.ndarray  # two-sided p = 2 (1 - Phi(|z|))


def delong_paired(labels, scores_a, scores_b) -> PairedTest:
  """Paired DeLong test of AUC_a = AUC_b for two score sets on the same labelled images.

  var(A - B) = (S10_aa + S10_bb - 2 S10_ab) / m + (S01_aa + S01_bb - 2 S01_ab) / n, S the
  sample (co)variances of the two runs' structural components (DeLong et al. 1988; computed
  as in Sun & Xu 2014); z = (AUC_a - AUC_b) / sqrt(var), p = 2 (1 - Phi(|z|)). Vectorised over
  the K columns (classes). Degenerate cases: var = 0 gives z = 0, p = 1 when the AUCs are
  equal and |z| = inf, p = 0 otherwise; fewer than 2 positives or negatives give NaN.
  Images are taken as independent (for patient clustering see `paired_bootstrap_auc`).
  """
  y, sa, one = _as_2d(labels, scores_a)
  _, sb, _ = _as_2d(labels, scores_b)
  if sa.shape != sb.shape:
    raise ValueError(f"scores_a {sa.shape} and scores_b {sb.shape} differ")
  auc_a, v10a, v01a = delong_components(y, sa)
  auc_b, v10b, v01b = delong_components(y, sb)
  m, n = y.sum(axis=0), (~y).sum(axis=0)
  d10, d01 = v10a - v10b, v01a - v01b  # var(a - b) = var(a) + var(b) - 2 cov(a, b)
  with np.errstate(invalid="ignore", divide="ignore"):
    var = _cov(d10, d10, y) / m + _cov(d01, d01, ~y) / n
    diff = auc_a - auc_b
    z = np.where(var > 0, diff / np.sqrt(var), np.where(diff == 0, 0.0, np.sign(diff) * np.inf))
  z = np.where(np.isnan(var) | np.isnan(diff), np.nan, z)
  p = 2.0 * scipy.stats.norm.sf(np.abs(z))
  out = PairedTest(auc_a, auc_b, diff, var, z, p)
  return PairedTest(*(x[0] for x in out)) if one else out


# ----------------------------------------------------------------------------------------------
# Paired patient bootstrap


class BootstrapDiff(NamedTuple):
  diff: np.ndarray  # (K,) observed a - b
  se: np.ndarray  # bootstrap standard deviation of the difference
  lo: np.ndarray  # percentile (1 - alpha) interval of the difference
  hi: np.ndarray
  p: np.ndarray  # two-sided bootstrap p (see `_boot_p`)


def _patient_counts(patient_ids, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(patient index of each row, (n_boot, P) multiplicities of patients drawn with replacement)."""
  _, pid = np.unique(np.asarray(patient_ids), return_inverse=True)
  n_pat = int(pid.max()) + 1 if pid.size else 0
  rng = np.random.default_rng(seed)
  counts = rng.multinomial(n_pat, np.full(n_pat, 1.0 / max(n_pat, 1)), size=n_boot)
  return pid.ravel(), counts


def _boot_p(diff: np.ndarray, boot: np.ndarray) -> np.ndarray:
  """Two-sided p of H0: delta = 0 from bootstrap differences boot (B, K) around diff (K,).

  The centred bootstrap (Efron & Tibshirani 1993, Sec 16.4): under H0 the spread of
  boot - diff stands in for that of diff, so p = (1 + #{|boot - diff| >= |diff|}) / (1 + B)
  over the defined resamples. NaN where diff is NaN or no resample is defined.
  """
  ok = ~np.isnan(boot)
  b = ok.sum(axis=0)
  exceed = (np.abs(boot - diff) >= np.abs(diff) - 1e-12) & ok
  with np.errstate(invalid="ignore", divide="ignore"):
    p = (1.0 + exceed.sum(axis=0)) / (1.0 + b)
  return np.where(np.isnan(diff) | (b == 0), np.nan, np.minimum(p, 1.0))


def _summarize(diff, boot, alpha) -> BootstrapDiff:
  k = boot.shape[1]
  se, lo, hi = np.full(k, np.nan), np.full(k, np.nan), np.full(k, np.nan)
  for j in range(k):
    v = boot[:, j][~np.isnan(boot[:, j])]
    if v.size > 1:
      se[j] = v.std(ddof=1)
      lo[j], hi[j] = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return BootstrapDiff(diff, se, lo, hi, _boot_p(diff, boot))


def paired_bootstrap_auc(
  labels,
  scores_a,
  scores_b,
  patient_ids,
  *,
  n_boot: int = 1000,
  seed: int = 0,
  alpha: float = ALPHA,
) -> BootstrapDiff:
  """Paired patient bootstrap of AUC_a - AUC_b per class (labels, scores: (N, K)).

  Each resample draws patients with replacement (every image of a drawn patient enters with
  the patient's multiplicity, as `classification.bootstrap_auc_ci` does) and evaluates BOTH runs on
  it, so the difference keeps the pairing. AUCs are `classification.per_class_auc` on the resampled
  rows (cost ~ n_boot sorts of the N x 2K scores). Resamples without positives or negatives
  of a class are skipped for it.
  """
  y, sa, _ = _as_2d(labels, scores_a)
  _, sb, _ = _as_2d(labels, scores_b)
  if sa.shape != sb.shape:
    raise ValueError(f"scores_a {sa.shape} and scores_b {sb.shape} differ")
  pid, counts = _patient_counts(patient_ids, n_boot, seed)
  if pid.shape != (y.shape[0],):
    raise ValueError(f"patient_ids {pid.shape} must be ({y.shape[0]},)")
  k = y.shape[1]
  yy, ss = np.concatenate([y, y], axis=1), np.concatenate([sa, sb], axis=1)
  both = classification.per_class_auc(yy, ss)
  diff = both[:k] - both[k:]
  boot = np.empty((n_boot, k))
  for b in range(n_boot):
    rows = np.repeat(np.arange(y.shape[0]), counts[b][pid])
    a = classification.per_class_auc(yy[rows], ss[rows])
    boot[b] = a[:k] - a[k:]
  return _summarize(diff, boot, alpha)


def paired_bootstrap_dice(
  dice_a,
  dice_b,
  patient_ids,
  classes=None,
  *,
  n_boot: int = 2000,
  seed: int = 0,
  alpha: float = ALPHA,
) -> tuple[list, BootstrapDiff]:
  """Paired patient bootstrap of mean DICE_a - mean DICE_b, per class.

  dice_a, dice_b: (C,) DICE of the same C box cases (one case = one test image and one box
  class, as in Table 3) under two runs; patient_ids: (C,) the case's patient; classes: (C,)
  the case's class (None: one group of all cases). Patients are drawn with replacement once
  per resample for all classes; a class's resampled statistic is the mean over its drawn cases
  (with multiplicity) of DICE_a - DICE_b. Returns (class names in sorted order, BootstrapDiff
  with (n_classes,) arrays).
  """
  da = np.asarray(dice_a, dtype=np.float64).ravel()
  db = np.asarray(dice_b, dtype=np.float64).ravel()
  if da.shape != db.shape:
    raise ValueError(f"dice_a {da.shape} and dice_b {db.shape} differ")
  cls = np.zeros(da.shape, dtype=np.int64) if classes is None else np.asarray(classes)
  if cls.shape != da.shape:
    raise ValueError(f"classes {cls.shape} must be {da.shape}")
  names, ci = np.unique(cls, return_inverse=True)
  pid, counts = _patient_counts(patient_ids, n_boot, seed)
  if pid.shape != da.shape:
    raise ValueError(f"patient_ids {pid.shape} must be {da.shape}")
  n_pat, k = counts.shape[1], names.size
  # Per (patient, class): sum of differences and number of cases; a resample is a matmul.
  s = np.zeros((n_pat, k))
  c = np.zeros((n_pat, k))
  np.add.at(s, (pid, ci), da - db)
  np.add.at(c, (pid, ci), 1.0)
  cf = counts.astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    diff = s.sum(axis=0) / c.sum(axis=0)
    boot = (cf @ s) / (cf @ c)
  return names.tolist(), _summarize(diff, boot, alpha)


# ----------------------------------------------------------------------------------------------
# Multiplicity and bold


def holm(p_values) -> np.ndarray:
  """Holm's (1979) step-down adjusted p-values over the last axis (the classes).

  With the m defined p-values sorted ascending p_(1) <= ... <= p_(m), the adjusted value is
  p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)); rejecting where p~ <= alpha controls the
  family-wise error rate at alpha. NaN entries stay NaN and do not count in m.
  """
  p = np.asarray(p_values, dtype=np.float64)
  flat = p.reshape(-1, p.shape[-1]) if p.ndim else p.reshape(1, 1)
  out = np.full(flat.shape, np.nan)
  for r, row in enumerate(flat):
    idx = np.flatnonzero(~np.isnan(row))
    order = idx[np.argsort(row[idx], kind="stable")]
    m = order.size
    adj = np.minimum(1.0, (m - np.arange(m)) * row[order])
    out[r, order] = np.maximum.accumulate(adj)
  return out.reshape(p.shape)


def pairwise_delong(labels, scores: Sequence) -> np.ndarray:
  """Raw paired-DeLong p-values of every pair of runs: scores [R x (N, K)] -> (R, R, K).

  Symmetric; the diagonal is NaN.
  """
  r = len(scores)
  k = np.asarray(scores[0]).shape[1]
  out = np.full((r, r, k), np.nan)
  for i in range(r):
    for j in range(i + 1, r):
      out[i, j] = out[j, i] = delong_paired(labels, scores[i], scores[j]).p
  return out


def pairwise_bootstrap_dice(
  dice: Sequence, patient_ids, classes, *, n_boot: int = 2000, seed: int = 0
) -> tuple[list, np.ndarray]:
  """Raw paired-bootstrap DICE p-values of every pair of runs.

  dice: R arrays (C,) over the same cases; patient_ids, classes: (C,). Returns (class names,
  (R, R, n_classes) p, symmetric, NaN diagonal). Every pair uses the same resamples (seed).
  """
  r = len(dice)
  names = np.unique(np.asarray(classes)).tolist()
  out = np.full((r, r, len(names)), np.nan)
  for i in range(r):
    for j in range(i + 1, r):
      _, res = paired_bootstrap_dice(
        dice[i], dice[j], patient_ids, classes, n_boot=n_boot, seed=seed
      )
      out[i, j] = out[j, i] = res.p
  return names, out


def significant_best(
  values, p_pairs, *, alpha: float = ALPHA, higher_is_better: bool = True
) -> np.ndarray:
  """Which run is significantly best per class: the cells to bold.

  values: (R, K) per-run, per-class values (e.g. AUC or mean DICE; NaN = missing);
  p_pairs: (R, R, K) raw two-sided p of each pair of runs per class (`pairwise_delong`,
  `pairwise_bootstrap_dice`). Each pair's K p-values are Holm-corrected over the classes
  (`holm`). Cell (r, k) is True iff run r has the strictly best value of class k and, for
  every other run with a value there, is better at Holm-adjusted p < alpha. At most one True
  per class; none with fewer than two runs. Returns bool (R, K).
  """
  v = np.asarray(values, dtype=np.float64)
  p = np.asarray(p_pairs, dtype=np.float64)
  if v.ndim != 2 or p.shape != (v.shape[0], v.shape[0], v.shape[1]):
    raise ValueError(f"values {v.shape} and p_pairs {p.shape} must be (R, K) and (R, R, K)")
  adj = holm(p)
  sign = 1.0 if higher_is_better else -1.0
  out = np.zeros(v.shape, dtype=bool)
  for k in range(v.shape[1]):
    have = np.flatnonzero(~np.isnan(v[:, k]))
    if have.size < 2:
      continue
    best = have[np.argmax(sign * v[have, k])]
    others = have[have != best]
    better = sign * (v[best, k] - v[others, k]) > 0
    out[best, k] = bool(np.all(better & (adj[best, others, k] < alpha)))
  return out


# ----------------------------------------------------------------------------------------------
# Everything Table 3 needs, in one JSON-able dict


def _pairs_json(run_labels, names, p, extra: dict) -> list[dict]:
  adj = holm(p)
  out = []
  for i in range(len(run_labels)):
    for j in range(i + 1, len(run_labels)):
      row = {"a": run_labels[i], "b": run_labels[j]}
      for key, arr in extra.items():
        row[key] = dict(zip(names, arr[i, j].tolist(), strict=True))
      row["p"] = dict(zip(names, p[i, j].tolist(), strict=True))
      row["p_holm"] = dict(zip(names, adj[i, j].tolist(), strict=True))
      out.append(row)
  return out


def _bold_json(run_labels, names, best) -> dict[str, list[str]]:
  return {
    lb: [c for c, b in zip(names, best[r], strict=True) if b] for r, lb in enumerate(run_labels)
  }


def compare_runs(
  run_labels: Sequence[str],
  labels,
  scores: Sequence,
  classes: Sequence[str],
  *,
  dice: Sequence | None = None,
  dice_patients=None,
  dice_classes=None,
  n_boot: int = 2000,
  seed: int = 0,
  alpha: float = ALPHA,
) -> dict:
  """Pairwise tests of R runs and the Table 3 bold, as one JSON-able dict.

  AUC: labels (N, K) and scores [R x (N, K)] on the same test images, classes the K names;
  paired DeLong per class (`pairwise_delong`). DICE (optional): dice [R x (C,)] per-case DICE
  on the same C box cases, dice_patients (C,) and dice_classes (C,) (names from `classes`);
  paired patient bootstrap (`pairwise_bootstrap_dice`). Returns
  {'rule': BOLD_RULE, 'alpha',
   'auc': {'test', 'pairs': [{'a', 'b', 'diff', 'z', 'p', 'p_holm': {class: v}}],
           'bold': {run: [classes]}},
   'dice': {'test', 'n_boot', 'seed', 'mean': {run: {class: v}},
            'pairs': [{'a', 'b', 'diff', 'p', 'p_holm'}], 'bold': {run: [classes]}}?};
  p_holm is Holm-adjusted over the classes of that pair; bold per `significant_best`.
  """
  run_labels = [str(x) for x in run_labels]
  names = list(classes)
  r = len(run_labels)
  if len(scores) != r:
    raise ValueError(f"{len(scores)} score arrays for {r} runs")
  auc = np.stack([delong(labels, s).auc for s in scores])  # (R, K)
  p = np.full((r, r, len(names)), np.nan)
  z = np.full_like(p, np.nan)
  diff = np.full_like(p, np.nan)
  for i in range(r):
    for j in range(i + 1, r):
      t = delong_paired(labels, scores[i], scores[j])
      p[i, j] = p[j, i] = t.p
      z[i, j], z[j, i] = t.z, -t.z
      diff[i, j], diff[j, i] = t.diff, -t.diff
  out = {
    "rule": BOLD_RULE,
    "alpha": alpha,
    "auc": {
      "test": "paired DeLong (Sun & Xu 2014)",
      "pairs": _pairs_json(run_labels, names, p, {"diff": diff, "z": z}),
      "bold": _bold_json(run_labels, names, significant_best(auc, p, alpha=alpha)),
    },
  }
  if dice is None:
    return out
  if len(dice) != r:
    raise ValueError(f"{len(dice)} DICE arrays for {r} runs")
  cls = np.asarray(dice_classes)
  box_names = [c for c in names if (cls == c).any()]
  unknown = sorted(set(cls.tolist()) - set(names))
  if unknown:
    raise ValueError(f"dice_classes {unknown} are not among classes")
  got, pd = pairwise_bootstrap_dice(dice, dice_patients, cls, n_boot=n_boot, seed=seed)
  order = [got.index(c) for c in box_names]
  pd = pd[..., order]
  mean = np.array([[np.mean(np.asarray(d)[cls == c]) for c in box_names] for d in dice])
  ddiff = mean[:, None, :] - mean[None, :, :]
  out["dice"] = {
    "test": "paired patient bootstrap",
    "n_boot": int(n_boot),
    "seed": int(seed),
    "mean": {
      lb: dict(zip(box_names, mean[i].tolist(), strict=True)) for i, lb in enumerate(run_labels)
    },
    "pairs": _pairs_json(run_labels, box_names, pd, {"diff": ddiff}),
    "bold": _bold_json(run_labels, box_names, significant_best(mean, pd, alpha=alpha)),
  }
  return out
