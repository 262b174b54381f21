"""Per-class operating thresholds (TorchXRayVision's op_threshs), chosen on validation data.

A decision is `p >= threshold`. `choose` picks one threshold per class by a rule:

- 'youden' (default): the threshold maximising Youden's J = sensitivity + specificity - 1;
- 'sens=X': the highest threshold whose sensitivity is at least X (the most specific such);
- 'spec=X': the lowest threshold whose specificity is at least X (the most sensitive such);
- 'f1': the threshold maximising F1 = 2 TP / (2 TP + FP + FN).

Candidates are the class's distinct validation probabilities (every decision a threshold
can make on them); among equal scores the highest threshold wins. A class without both
positives and negatives gets no threshold (None), nor does a 'sens=' / 'spec=' target no
candidate reaches. `rates` scores stored thresholds on another split (sensitivity,
specificity, positive predictive value), with patient-bootstrap intervals of sensitivity and
specificity when given patient ids (`bootstrap_rates`: patients resampled with replacement,
each image weighted by its patient's count, as the AUC intervals of
`lsemil.metrics.classification`). Pure numpy (no JAX).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lsemil.core.errors import ConfigError
from lsemil.metrics import classification

DEFAULT_RULE = "youden"
RULES = ("youden", "f1", "sens=X", "spec=X")


def parse(rule: str) -> tuple[str, float | None]:
  """'youden' | 'f1' | 'sens=0.9' | 'spec=0.9' -> (kind, target); ConfigError naming
  --operating-point for anything else."""
  text = str(rule).strip().lower()
  if text in ("youden", "f1"):
    return text, None
  kind, _, value = text.partition("=")
  try:
    target = float(value)
  except ValueError:
    target = float("nan")
  if kind not in ("sens", "spec") or not 0.0 < target <= 1.0:
    raise ConfigError(
      f"--operating-point {rule}: choose youden, f1, sens=X or spec=X with X in (0, 1]"
    )
  return kind, target


def _curve(p: np.ndarray, y: np.ndarray):
  """(thresholds descending, TP, FP) at each distinct probability (decision p >= t)."""
  order = np.argsort(-p, kind="stable")
  p, y = p[order], y[order]
  last = np.r_[np.flatnonzero(np.diff(p) != 0), len(p) - 1]  # last index of each value
  tp = np.cumsum(y)[last]
  fp = np.cumsum(1 - y)[last]
  return p[last], tp, fp


def _one(p: np.ndarray, y: np.ndarray, kind: str, target: float | None) -> float | None:
  pos, neg = int(y.sum()), int(len(y) - y.sum())
  if pos == 0 or neg == 0:
    return None
  t, tp, fp = _curve(p, y)
  sens, spec = tp / pos, 1.0 - fp / neg
  if kind == "youden":
    score = sens + spec - 1.0
  elif kind == "f1":
    score = 2 * tp / (2 * tp + fp + (pos - tp))
  elif kind == "sens":
    ok = np.flatnonzero(sens >= target - 1e-12)
    return float(t[ok[0]]) if len(ok) else None  # descending: the first is the highest
  else:
    ok = np.flatnonzero(spec >= target - 1e-12)
    return float(t[ok[-1]]) if len(ok) else None  # the last is the lowest
  return float(t[int(np.argmax(score))])  # the first maximum: the highest threshold


def bootstrap_rates(thresholds, probs, labels, patient_ids, counts) -> tuple[np.ndarray, ...]:
  """(sensitivity, specificity), each (B, K), of the decisions `p >= threshold` under B
  resamples of patients: counts[b, p] = how often patient p (np.unique(patient_ids) order)
  was drawn; NaN where a class has no threshold or the resample no positive / negative."""
  p, y = np.asarray(probs, np.float64), np.asarray(labels, np.float64) > 0.5
  t = np.array([np.inf if v is None else float(v) for v in thresholds])
  d = p >= t
  _, pid = np.unique(np.asarray(patient_ids), return_inverse=True)
  per_patient = {}
  for name, cells in (("tp", d & y), ("pos", y), ("fp", d & ~y), ("neg", ~y)):
    per_patient[name] = np.zeros((int(pid.max()) + 1 if len(pid) else 0, p.shape[1]))
    np.add.at(per_patient[name], pid.ravel(), cells.astype(np.float64))
  c = np.asarray(counts, np.float64)
  tp, pos, fp, neg = (c @ per_patient[k] for k in ("tp", "pos", "fp", "neg"))
  undefined = np.array([v is None for v in thresholds])
  with np.errstate(invalid="ignore", divide="ignore"):
    sens = np.where((pos > 0) & ~undefined, tp / pos, np.nan)
    spec = np.where((neg > 0) & ~undefined, 1.0 - fp / neg, np.nan)
  return sens, spec


def rates(
  thresholds: Sequence[float | None],
  probs,
  labels,
  patient_ids=None,
  *,
  n_boot: int = 0,
  seed: int = 0,
  alpha: float = 0.05,
) -> dict[str, list]:
  """{'sensitivity', 'specificity', 'ppv', 'num_positives'} per class of the decisions
  `p >= threshold` (None where the threshold is None or the rate is undefined); with
  `patient_ids` and `n_boot` > 0 also the (1 - alpha) patient-bootstrap intervals
  'sensitivity_lo' / '_hi' and 'specificity_lo' / '_hi'."""
  p, y = np.asarray(probs, np.float64), np.asarray(labels, np.float64) > 0.5
  out: dict[str, list] = {"sensitivity": [], "specificity": [], "ppv": [], "num_positives": []}
  for k, t in enumerate(thresholds):
    yk = y[:, k]
    out["num_positives"].append(int(yk.sum()))
    if t is None:
      for key in ("sensitivity", "specificity", "ppv"):
        out[key].append(None)
      continue
    d = p[:, k] >= float(t)
    tp, fp = int((d & yk).sum()), int((d & ~yk).sum())
    pos, neg = int(yk.sum()), int((~yk).sum())
    out["sensitivity"].append(tp / pos if pos else None)
    out["specificity"].append(1.0 - fp / neg if neg else None)
    out["ppv"].append(tp / (tp + fp) if tp + fp else None)
  if patient_ids is not None and n_boot > 0 and len(p):
    n_pat = np.unique(np.asarray(patient_ids)).size
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=int(n_boot))
    for name, boot in zip(
      ("sensitivity", "specificity"),
      bootstrap_rates(thresholds, p, y, patient_ids, counts),
      strict=True,
    ):
      lo, hi = classification.percentile_interval(boot, alpha)
      out[f"{name}_lo"] = [None if np.isnan(v) else float(v) for v in lo]
      out[f"{name}_hi"] = [None if np.isnan(v) else float(v) for v in hi]
  return out


def choose(probs, labels, rule: str = DEFAULT_RULE, classes: Sequence[str] = ()) -> dict:
  """Per-class thresholds of `rule` on (N, K) probabilities and 0/1 labels (JSON-ready):
  {'rule', 'classes', 'thresholds' [K, None where undefined], 'num_images', and `rates` at
  the thresholds on these data}."""
  kind, target = parse(rule)
  p, y = np.asarray(probs, np.float64), (np.asarray(labels, np.float64) > 0.5).astype(np.int64)
  if p.ndim != 2 or p.shape != y.shape:
    raise ValueError(f"probs and labels must be the same (N, K), got {p.shape} and {y.shape}")
  thresholds = [_one(p[:, k], y[:, k], kind, target) for k in range(p.shape[1])]
  return {
    "rule": str(rule).strip().lower(),
    "classes": list(classes),
    "thresholds": thresholds,
    "num_images": int(len(p)),
    **rates(thresholds, p, y),
  }
