"""Weak localization scored the way the field scores it: host-side numpy, no JAX.

Every protocol is computed per box class over the box images of a split, with a 95% percentile
bootstrap interval that resamples PATIENTS (as `classification.bootstrap_auc_ci`; the
chexlocalize_* protocols resample images, as cheXlocalize's eval.py). A *case* is one
(image, box class): its ground truth G is the union of the image's boxes of that class on the
`size` x `size` grid (`overlap.boxes_to_mask`: box (x, y, w, h), x the column), and S is the
class's saliency map resized to that grid (`overlap.resize_saliency`, `method`). Maps must lie
in [0, 1] (sigmoid maps, min-max scaled CAMs, the constant map, the centre prior).

Protocols (`score_all`; keys of its result):

- 'dice': the continuous DICE of Sec 4.2 (`overlap.dice`), beside the best constant map
  (`overlap.uniform_dice`, c* = sqrt(|G| / A): an oracle that knows the box area).
- 'acc_iobb@T', 'acc_iou@T' (Wang et al. 2017, ChestX-ray8): S >= tau, connected components
  boxed (`overlap.predicted_boxes`, 8-connectivity); a ground-truth box is found when some
  predicted box reaches IoBB (IoU) >= T; accuracy = found / boxes. 'afp_iobb@T', 'afp_iou@T':
  the average number of false-positive boxes per case, predicted boxes that reach no
  ground-truth box at T. Each carries 'by_tau', the whole tau sweep over all cases (the
  paper's Table 2 shows how much tau matters); the headline value is at the tau that maximizes
  the accuracy on the tuning half, reported on the reporting half.
- 'chexlocalize_miou_otsu', 'chexlocalize_miou_tuned', 'chexlocalize_hit_rate': cheXlocalize's
  protocols as its official code computes them (`lsemil.metrics.chexlocalize`): the map
  bilinearly resized to the box_space x box_space image, uint8 Otsu with contour filling or the
  threshold 0.2..0.8 tuned on the tuning half (reported on the other half), true-positive-only
  IoU, the first argmax pixel; value = the mean of eval.py's image-level bootstrap replicates
  (`n_boot` of them, seeded with `seed`), 'point' the plain mean.
- 'miou_otsu_float', 'miou_tuned' (lsemil's earlier cheXlocalize-style variants): S min-max
  scaled to [0, 1] on the `size` grid (a constant map scales to 0, i.e. predicts nothing) and
  binarized as S > t, t the float Otsu threshold of the scaled map (`otsu_threshold`, equal to
  skimage.filters.threshold_otsu; no uint8 step, no contour filling) or a per-class t in
  `MIOU_THRESHOLDS` (0.2..0.7) that maximizes the mIoU on the tuning half, reported on the
  reporting half. IoU per case; 'value' is the mean over cases whose predicted mask is
  non-empty (cheXlocalize's true_pos_only default; G is never empty here), 'empty0' the mean
  with empty predictions counted as IoU 0. With `prob_cutoffs`, 'miou_otsu_cutoff' and
  'miou_tuned_cutoff' also blank the mask of a case whose class probability is below a
  per-class cutoff that maximizes the 'empty0' mIoU on the tuning half (cheXlocalize tunes its
  probability cutoff on that mean). On box images only, blanking can only lower 'empty0';
  the cutoff matters when the caller's cases include images without that finding.
- 'hit_rate_expected' (pointing game, lsemil's variant): the argmax pixel of S lies in G. Ties
  at the maximum count fractionally (|argmax set in G| / |argmax set|, the expected hit of a
  random pick: a constant map scores the box's area fraction); an all-zero map points nowhere
  (0).
- 'energy' (energy-based pointing game, Wang et al. 2020 Score-CAM): sum(S G) / sum(S); 0 for
  an all-zero map.
- 'auprc': average precision of the pixel scores against G pooled over all pixels of all
  cases of the class (`average_precision`, sklearn's step-wise AP); scores are quantized to
  `AP_LEVELS` levels on [0, 1] (ties within 1.5e-5 merge) so memory stays bounded. 'base_rate'
  is the positive pixel fraction, the AP of an uninformative map.

Tuning split (`tuning_half`): a case belongs to the tuning half when the first byte of
sha256(str(patient id)) is even; deterministic, patient-wise, independent of the data order.
Tuned values are chosen on the tuning half only (the first grid value among ties, and when
the tuning half defines none, e.g. nothing is ever predicted) and
bootstrapped over the reporting half's patients with the choice held fixed.

`boxes_from_map` gives `predict --boxes` the IoBB protocol's boxes in the input image's own
pixels. Table 4 (several sources' results side by side) is
`lsemil.reporting.paper_tables.table4_rows`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage
import scipy.sparse

from lsemil.core import fileio
from lsemil.data import nih
from lsemil.metrics import chexlocalize, classification, overlap

EVAL_SIZE = 512  # the paper's evaluation grid (Sec 4.2)
DEFAULT_TAUS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)  # T(IoBB) / T(IoU), Wang et al.
MIOU_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)  # not 0.8: miou_tuned
PROB_CUTOFFS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # cheXlocalize
AP_LEVELS = 2**16
KINDS = ("iobb", "iou")
_EIGHT = np.ones((3, 3), dtype=bool)  # the 8-connectivity of overlap.predicted_boxes


@dataclasses.dataclass(frozen=True)
class Case:
  """One (image, box class): its boxes (x, y, w, h) in box_space pixels, patient, P(class)."""

  row: int
  cls: int
  boxes: tuple[tuple[float, float, float, float], ...]
  patient: Any
  prob: float = float("nan")


def make_cases(box_cases: Mapping[int, Sequence], patient_ids, probs=None) -> list[Case]:
  """Cases from `evaluate.box_cases` ({row: [(class, [(x, y, w, h), ...]), ...]}).

  patient_ids and probs are indexed by row: arrays over the dataset index (e.g.
  `index.patient_ids`, probabilities (N, K)) or mappings {row: ...}; probs=None leaves NaN
  (no probability cutoff then).
  """
  out = []
  for row, by_cls in sorted(box_cases.items()):
    for k, boxes in by_cls:
      prob = float("nan") if probs is None else float(probs[row][k])
      box_t = tuple(tuple(float(v) for v in b) for b in boxes)
      out.append(Case(int(row), int(k), box_t, _plain(patient_ids[row]), prob))
  return out


def _plain(v):
  return v.item() if isinstance(v, np.generic) else v


def tuning_half(patient_id) -> bool:
  """True for the tuning half: the first byte of sha256(str(patient id)) is even."""
  return hashlib.sha256(str(_plain(patient_id)).encode()).digest()[0] % 2 == 0


# ----------------------------------------------------------------------------------------------
# Per-case primitives


def minmax(s) -> np.ndarray:
  """(s - min) / (max - min); a constant map becomes all zeros (cheXlocalize's NaNs -> empty)."""
  s = np.asarray(s, dtype=np.float64)
  lo, hi = float(s.min()), float(s.max())
  return (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)


def otsu_threshold(image, nbins: int = 256, weight: float | None = None) -> float:
  """Otsu's threshold of a float image, as skimage.filters.threshold_otsu(image, nbins).

  A `nbins` histogram over [min, max]; the threshold is the bin centre maximizing the
  between-class variance w1 w2 (m1 - m2)^2 (first maximum); a constant image returns its
  value. Foreground is image > threshold. `weight`: every pixel stands for that many (a
  block-replicated image given by its small map); a power of two scales every sum exactly,
  so the threshold is the replicated image's to the bit.
  """
  x = np.asarray(image, dtype=np.float64).ravel()
  if np.all(x == x[0]):
    return float(x[0])
  if weight is None:
    counts, edges = np.histogram(x, bins=nbins)
  else:
    counts, edges = np.histogram(x, bins=nbins, weights=np.full(x.shape, float(weight)))
  centres = (edges[:-1] + edges[1:]) / 2.0
  counts = counts.astype(np.float32)  # skimage's dtype, for identical ties
  w1 = np.cumsum(counts)
  w2 = np.cumsum(counts[::-1])[::-1]
  m1 = np.cumsum(counts * centres) / w1
  m2 = (np.cumsum((counts * centres)[::-1]) / w2[::-1])[::-1]
  between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
  return float(centres[int(np.argmax(between))])


def iou(pred, gt) -> float:
  """|P and G| / |P or G| of two boolean masks; 0 when both are empty."""
  p, g = np.asarray(pred, bool), np.asarray(gt, bool)
  union = int((p | g).sum())
  return int((p & g).sum()) / union if union else 0.0


def hit(s, gt) -> float:
  """Pointing game: share of the argmax pixels of s inside gt (0 for an all-zero map)."""
  s = np.asarray(s, dtype=np.float64)
  top = float(s.max())
  if top <= 0:
    return 0.0
  at_max = s == top
  return float((at_max & (np.asarray(gt) > 0)).sum() / at_max.sum())


def energy(s, gt) -> float:
  """Energy pointing game: sum(s inside gt) / sum(s) (0 for an all-zero map)."""
  s = np.asarray(s, dtype=np.float64)
  total = float(s.sum())
  return float((s * (np.asarray(gt) > 0)).sum() / total) if total > 0 else 0.0


def _ap_from_groups(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
  """AP = sum_n (R_n - R_{n-1}) P_n over score groups sorted high to low; tp, fp (G, B)."""
  ctp, cfp = np.cumsum(tp, axis=0), np.cumsum(fp, axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    prec = np.where(ctp + cfp > 0, ctp / (ctp + cfp), 0.0)
    ap = (tp * prec).sum(axis=0) / ctp[-1]
  return np.where(ctp[-1] > 0, ap, np.nan)


def average_precision(y_true, y_score, sample_weight=None) -> float:
  """Average precision (sklearn.metrics.average_precision_score): sum_n (R_n - R_{n-1}) P_n
  with one threshold per distinct score; NaN without positives."""
  y = np.asarray(y_true).ravel() > 0
  s = np.asarray(y_score, dtype=np.float64).ravel()
  w = np.ones(s.size) if sample_weight is None else np.asarray(sample_weight, np.float64).ravel()
  _, inv = np.unique(-s, return_inverse=True)  # group 0 = the highest score
  tp = np.bincount(inv.ravel(), weights=w * y)
  fp = np.bincount(inv.ravel(), weights=w * ~y)
  return float(_ap_from_groups(tp[:, None], fp[:, None])[0])


def gt_ranges(boxes, size: int, box_space: float) -> np.ndarray:
  """Each box's pixel region [c0, r0, c1, r1) on the grid, from `overlap.boxes_to_mask`."""
  out = np.zeros((len(boxes), 4), np.int64)
  for i, b in enumerate(boxes):
    m = overlap.boxes_to_mask([b], size, box_space) > 0
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size:
      out[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
  return out


def box_overlaps(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
  """IoBB = |G and P| / |P| and IoU of every (ground-truth, predicted) box pair: (Mg, Mp) each.

  Boxes are int [c0, r0, c1, r1) pixel ranges (`overlap.predicted_boxes`, `gt_ranges`); the
  per-ground-truth maximum is `overlap.localization_hits`.
  """
  inter, area_g, area_p = overlap.box_pair_areas(gt, pred)
  union = area_g + area_p - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iobb = np.where(area_p > 0, inter / area_p, 0.0)
    iou_ = np.where(union > 0, inter / union, 0.0)
  return {"iobb": iobb, "iou": iou_}


def grid_boxes(s_native, tau: float, size: int, method: str = "nearest", s_grid=None) -> np.ndarray:
  """`overlap.predicted_boxes` of a map on the size x size grid: int (M, 4) [c0, r0, c1, r1).

  For a square n x n map with n dividing size and nearest resizing, the resized map is the
  map with every pixel replicated into an f x f block (f = size / n): its 8-connected
  components are the map's, scaled by f, so they are computed on the small map. Otherwise
  on the resized map (`s_grid` when the caller has it).
  """
  s_native = np.asarray(s_native)
  n = s_native.shape[0]
  if method == "nearest" and s_native.shape == (n, n) and size % n == 0:
    return overlap.predicted_boxes(s_native, tau, n, method) * (size // n)
  if s_grid is None:
    s_grid = overlap.resize_saliency(s_native, size, method)
  return overlap.predicted_boxes(s_grid, tau, size)


def wang_counts(s_native, gt_ranges, taus, ts, size: int, method: str = "nearest", s_grid=None):
  """Found ground-truth boxes and false-positive predicted boxes of one case at each
  (kind, tau, T): two int arrays (2, len(taus), len(ts)), kind 0 = IoBB, 1 = IoU."""
  found = np.zeros((2, len(taus), len(ts)), np.int64)
  fp = np.zeros_like(found)
  t = np.asarray(ts, np.float64)
  for i, tau in enumerate(taus):
    pred = grid_boxes(s_native, tau, size, method, s_grid)
    if len(pred) == 0:
      continue
    ov = box_overlaps(pred, gt_ranges)
    for j, kind in enumerate(KINDS):
      found[j, i] = (ov[kind].max(axis=1)[:, None] >= t).sum(axis=0)
      fp[j, i] = (ov[kind].max(axis=0)[:, None] < t).sum(axis=0)
  return found, fp


# ----------------------------------------------------------------------------------------------
# Boxes for `predict --boxes`


def boxes_from_map(
  saliency_map,
  tau: float,
  image_hw: tuple[int, int],
  *,
  size: int = EVAL_SIZE,
  method: str = "nearest",
) -> list[dict[str, float]]:
  """The IoBB protocol's boxes of one class map, in the input image's own pixels.

  The (n, n) map covers the whole input image (the model input is the image stretched to a
  square, `pipeline.eval_image`). It is resized to `size` x `size` and binarized at S >= tau;
  each 8-connected component's bounding box (`overlap.predicted_boxes`) is scaled to the
  image: grid column c maps to image x = c * W / size, row r to y = r * H / size. Returns
  [{'x', 'y', 'w', 'h', 'peak', 'mean'}] (peak / mean: the saliency over the component's
  pixels), highest peak first.
  """
  h_img, w_img = (int(v) for v in image_hw)
  s = overlap.resize_saliency(saliency_map, size, method)
  pred = overlap.predicted_boxes(s, tau, size)
  lab, n = scipy.ndimage.label(s >= tau, structure=_EIGHT)
  if n != len(pred):
    raise RuntimeError(f"{n} components but {len(pred)} boxes")  # same labelling: never
  index = np.arange(1, n + 1)
  # each component's maximum over its bounding slice (scipy.ndimage.maximum sorts every pixel)
  objs = scipy.ndimage.find_objects(lab)
  peaks = [s[o][lab[o] == i].max() for i, o in enumerate(objs, start=1)]
  means = scipy.ndimage.mean(s, lab, index) if n else []
  sx, sy = w_img / size, h_img / size
  out = [
    {
      "x": float(c0 * sx),
      "y": float(r0 * sy),
      "w": float((c1 - c0) * sx),
      "h": float((r1 - r0) * sy),
      "peak": float(pk),
      "mean": float(mn),
    }
    for (c0, r0, c1, r1), pk, mn in zip(pred, peaks, means, strict=True)
  ]
  return sorted(out, key=lambda b: -b["peak"])


# ----------------------------------------------------------------------------------------------
# Scoring one case


def _case_map(maps: Mapping, case: Case) -> np.ndarray | None:
  if (case.row, case.cls) in maps:
    return np.asarray(maps[(case.row, case.cls)], dtype=np.float64)
  if case.row in maps:
    return np.asarray(maps[case.row][..., case.cls], dtype=np.float64)
  return None


def _constant_dice(g_total: float, n_pixels: float) -> float:
  """`overlap.uniform_dice` of a 0/1 mask from its pixel count (the same float operations:
  G^2 = G)."""
  c = np.sqrt(g_total / n_pixels)
  den = c * c * n_pixels + g_total
  return 1.0 if den == 0.0 else 2.0 * c * g_total / den


def score_case(
  s_native, case: Case, box_space: float, cfg: dict, *, blocks: bool | None = None
) -> dict[str, Any]:
  """Every protocol's per-case quantity for one case (s_native: the (n, n) class map).

  A square n x n map with n dividing the grid side and nearest resizing is the map with each
  pixel replicated into an f x f block: every per-pixel sum is then taken on the small map,
  each pixel weighted by its block's area and ground-truth count (`blocks` None: whenever
  that holds; False: always on the full grid). Both give the same values (tested).
  """
  size = cfg["size"]
  native = np.asarray(s_native, dtype=np.float64)
  n = native.shape[0]
  replicated = cfg["method"] == "nearest" and native.shape == (n, n) and size % n == 0
  if blocks is None:
    blocks = replicated
  if blocks and not replicated:
    raise ValueError(f"a {native.shape} map does not tile a {size} grid by replication")
  s = native if blocks else overlap.resize_saliency(native, size, cfg["method"])
  lo, hi = float(s.min()), float(s.max())
  if lo < -1e-6 or hi > 1 + 1e-6:
    raise ValueError(
      f"saliency of row {case.row}, class {case.cls} is outside [0, 1]: [{lo:.4g}, {hi:.4g}]"
    )
  s = np.clip(s, 0.0, 1.0)
  g = overlap.boxes_to_mask(case.boxes, size, box_space)
  f = size // n if blocks else 1
  gc = g.reshape(n, f, n, f).sum(axis=(1, 3)) if blocks else g  # ground truth per pixel
  area = float(f * f)  # grid pixels per pixel of s
  gt = gt_ranges(case.boxes, size, box_space)
  found, fp = wang_counts(
    np.clip(native, 0.0, 1.0),
    gt,
    cfg["taus"],
    cfg["ts"],
    size,
    cfg["method"],
    None if blocks else s,
  )
  scaled = minmax(s)
  pred_otsu = scaled > otsu_threshold(scaled, weight=area if blocks else None)
  pred_thr = [scaled > t for t in cfg["thresholds"]]
  g_total = float(gc.sum())

  def iou_w(pred) -> float:  # iou(P, G) on the grid
    inter = float((gc * pred).sum())
    union = area * float(pred.sum()) + g_total - inter
    return inter / union if union else 0.0

  q = np.rint(s * (AP_LEVELS - 1)).astype(np.int64).ravel()
  pos = np.rint(np.bincount(q, weights=gc.ravel(), minlength=AP_LEVELS)).astype(np.int64)
  neg = np.rint(np.bincount(q, weights=area - gc.ravel(), minlength=AP_LEVELS)).astype(np.int64)
  levels = np.flatnonzero(pos + neg)
  total = float(s.sum())
  sg = float((s * gc).sum())
  den = area * float((s * s).sum()) + g_total
  top = float(s.max())
  at_max = s == top if top > 0 else None
  return {
    "dice": 1.0 if den == 0.0 else 2.0 * sg / den,  # overlap.dice (G is 0/1: G^2 = G)
    "dice_constant": _constant_dice(g_total, float(g.size)),
    "n_boxes": len(case.boxes),
    "found": found,
    "fp": fp,
    "iou_otsu": iou_w(pred_otsu),
    "pred_otsu": bool(pred_otsu.any()),
    "iou_thr": np.array([iou_w(p) for p in pred_thr]),
    "pred_thr": np.array([bool(p.any()) for p in pred_thr]),
    # `hit`: the share of the argmax pixels inside G; `energy`: sum(S G) / sum(S).
    "hit": float((gc * at_max).sum() / (area * at_max.sum())) if at_max is not None else 0.0,
    "energy": sg / (area * total) if total > 0 else 0.0,
    "ap": (levels, pos[levels], neg[levels]),
  }


# ----------------------------------------------------------------------------------------------
# Patient bootstrap


def _resample(n_pat: int, n_boot: int, rng) -> np.ndarray | None:
  """(n_boot, n_pat) multiplicities: n_pat patients drawn uniformly with replacement."""
  if n_boot <= 0 or n_pat == 0:
    return None
  return rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=n_boot).astype(np.float64)


def _ratio_ci(num, den, pid, n_pat, counts, alpha):
  """sum(num) / sum(den) per column and its bootstrap interval; num, den (cases, M)."""
  num, den = np.atleast_2d(num), np.atleast_2d(den)
  pn = np.zeros((n_pat, num.shape[1]))
  pd = np.zeros_like(pn)
  np.add.at(pn, pid, num)
  np.add.at(pd, pid, den)
  with np.errstate(invalid="ignore", divide="ignore"):
    value = np.where(pd.sum(0) > 0, pn.sum(0) / pd.sum(0), np.nan)
    if counts is None:
      return value, np.full_like(value, np.nan), np.full_like(value, np.nan)
    bn, bd = counts @ pn, counts @ pd
    boot = np.where(bd > 0, bn / bd, np.nan)
  return (value, *classification.percentile_interval(boot, alpha))


def _auprc_ci(aps, pid, n_pat, counts, alpha):
  """Pooled-pixel AP of a class and its interval: aps = [(levels, pos, neg)] per case."""
  levels = np.concatenate([a[0] for a in aps])
  rows = (AP_LEVELS - 1) - levels  # row 0 = the highest score
  cols = np.concatenate([np.full(len(a[0]), p) for a, p in zip(aps, pid, strict=True)])
  used, rows = np.unique(rows, return_inverse=True)
  shape = (len(used), n_pat)
  pos = scipy.sparse.csr_matrix((np.concatenate([a[1] for a in aps]), (rows, cols)), shape)
  neg = scipy.sparse.csr_matrix((np.concatenate([a[2] for a in aps]), (rows, cols)), shape)
  ones = np.ones((n_pat, 1))
  value = float(_ap_from_groups(pos @ ones, neg @ ones)[0])
  n_pix = float(pos.sum() + neg.sum())
  base = float(pos.sum()) / n_pix if n_pix else float("nan")
  if counts is None:
    return value, float("nan"), float("nan"), base, n_pix
  pos, neg = _merge_negative_runs(pos, neg)
  chunk = max(1, int(4e6 // max(pos.shape[0], 1)))
  boot = np.concatenate(
    [
      _ap_from_groups(pos @ counts[i : i + chunk].T, neg @ counts[i : i + chunk].T)
      for i in range(0, len(counts), chunk)
    ]
  )
  lo, hi = classification.percentile_interval(boot[:, None], alpha)
  return value, float(lo[0]), float(hi[0]), base, n_pix


def _merge_negative_runs(pos, neg):
  """The score groups with no positive pixel (in any patient) merged into the next group that
  has one, those after the last dropped: AP = sum_n tp_n P_n / sum tp only reads the
  cumulative counts at groups with positives, so every resample's AP is unchanged (integer
  counts: exactly), on fewer rows."""
  keep = np.flatnonzero(np.asarray(pos.sum(axis=1)).ravel() > 0)
  target = np.searchsorted(keep, np.arange(pos.shape[0]))  # the next kept row at or below
  inside = target < len(keep)
  merge = scipy.sparse.csr_matrix(
    (np.ones(int(inside.sum())), (target[inside], np.flatnonzero(inside))),
    shape=(len(keep), pos.shape[0]),
  )
  return (merge @ pos).tocsr(), (merge @ neg).tocsr()


# ----------------------------------------------------------------------------------------------
# Scoring a split


def _first_max(values) -> int | None:
  """Index of the first maximum, ignoring NaN (0 when all are NaN); None for no values."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return None
  return 0 if np.all(np.isnan(v)) else int(np.nanargmax(v))


def _entry(value, lo, hi, **extra) -> dict:
  return {"value": float(value), "lo": float(lo), "hi": float(hi), **extra}


@dataclasses.dataclass
class _ClassArrays:
  """One class's per-case quantities stacked (n cases first)."""

  cases: list[Case]
  nb: np.ndarray  # (n,) ground-truth boxes
  found: np.ndarray  # (n, 2, taus, ts)
  fp: np.ndarray  # (n, 2, taus, ts)
  iou_otsu: np.ndarray  # (n,)
  pred_otsu: np.ndarray  # (n,) 1.0 where the Otsu mask is non-empty
  iou_thr: np.ndarray  # (n, thresholds)
  pred_thr: np.ndarray  # (n, thresholds)
  prob: np.ndarray  # (n,)
  tune: np.ndarray  # (n,) bool: the tuning half

  @classmethod
  def stack(cls, scores: list[dict], cases: list[Case]) -> _ClassArrays:
    f64 = lambda key: np.array([s[key] for s in scores], np.float64)  # noqa: E731
    return cls(
      cases=cases,
      nb=f64("n_boxes"),
      found=f64("found"),
      fp=f64("fp"),
      iou_otsu=f64("iou_otsu"),
      pred_otsu=f64("pred_otsu"),
      iou_thr=f64("iou_thr"),
      pred_thr=f64("pred_thr"),
      prob=np.array([c.prob for c in cases], np.float64),
      tune=np.array([tuning_half(c.patient) for c in cases], bool),
    )


class _Boot:
  """Ratio statistics sum(num) / sum(den) over a set of cases, with patient resamples."""

  def __init__(self, cases: list[Case], cfg: dict, stream: tuple[int, ...]):
    _, self.pid = np.unique(np.array([str(c.patient) for c in cases]), return_inverse=True)
    self.n_pat = int(self.pid.max()) + 1 if len(cases) else 0
    rng = np.random.default_rng([cfg["seed"], *stream])
    self.counts = _resample(self.n_pat, cfg["n_boot"], rng)
    self.alpha = cfg["alpha"]
    self.names: list[str] = []
    self.nums: list[np.ndarray] = []
    self.dens: list[np.ndarray] = []

  def add(self, name: str, num, den=None) -> None:
    num = np.asarray(num, np.float64)
    self.names.append(name)
    self.nums.append(num)
    self.dens.append(np.ones_like(num) if den is None else np.asarray(den, np.float64))

  def run(self) -> dict[str, tuple[float, float, float]]:
    if not self.names or self.n_pat == 0:
      return {}
    v, lo, hi = _ratio_ci(
      np.stack(self.nums, 1),
      np.stack(self.dens, 1),
      self.pid,
      self.n_pat,
      self.counts,
      self.alpha,
    )
    return {n: (v[i], lo[i], hi[i]) for i, n in enumerate(self.names)}


_NAN3 = (np.nan, np.nan, np.nan)


def _class_results(scores: list[dict], cases: list[Case], cfg: dict, k: int) -> dict:
  """{protocol: entry} of one class from its cases' `score_case` results."""
  a = _ClassArrays.stack(scores, cases)
  n = len(cases)
  boot = _Boot(cases, cfg, (k, 0))
  for key in ("dice", "dice_constant", "hit", "energy"):
    boot.add(key, [s[key] for s in scores])
  boot.add("miou", a.iou_otsu * a.pred_otsu, a.pred_otsu)
  boot.add("miou0", a.iou_otsu)
  shape = a.found.shape[1:]
  for idx in np.ndindex(*shape):
    boot.add(("acc", *idx), a.found[(slice(None), *idx)], a.nb)
    boot.add(("afp", *idx), a.fp[(slice(None), *idx)])
  got = boot.run()
  out: dict[str, dict] = {}
  c, d = got["dice_constant"], got["dice"]
  out["dice"] = _entry(*d, n=n, constant=c[0], constant_lo=c[1], constant_hi=c[2])
  out["hit_rate_expected"] = _entry(*got["hit"], n=n)
  out["energy"] = _entry(*got["energy"], n=n)
  m0 = got["miou0"]
  out["miou_otsu_float"] = _entry(
    *got["miou"],
    n=n,
    n_pairs=int(a.pred_otsu.sum()),
    empty0=m0[0],
    empty0_lo=m0[1],
    empty0_hi=m0[2],
  )
  ap = _auprc_ci([s["ap"] for s in scores], boot.pid, boot.n_pat, boot.counts, cfg["alpha"])
  out["auprc"] = _entry(*ap[:3], n=n, base_rate=ap[3], n_pixels=int(ap[4]))
  choice = _tune(a, cfg)
  reported = _reported(a, cfg, k, choice)
  out.update(_wang_entries(a, cfg, choice, got, reported))
  out.update(_miou_entries(a, cfg, choice, reported))
  return out


def _tune(a: _ClassArrays, cfg: dict) -> dict[str, Any]:
  """Grid indices chosen on the tuning half (None where it has no case or no defined value)."""
  t = a.tune
  choice: dict[str, Any] = {"tau": {}, "threshold": None, "cutoff": {}}
  if not t.any():
    return choice
  with np.errstate(invalid="ignore", divide="ignore"):
    acc = a.found[t].sum(0) / a.nb[t].sum()  # (2, taus, ts)
    miou = (a.iou_thr[t] * a.pred_thr[t]).sum(0) / a.pred_thr[t].sum(0)
  for j, ti in np.ndindex(acc.shape[0], acc.shape[2]):
    choice["tau"][j, ti] = _first_max(acc[j, :, ti])
  choice["threshold"] = _first_max(miou)
  if cfg["prob_cutoffs"]:
    keep = a.prob[None, t] >= np.asarray(cfg["prob_cutoffs"])[:, None]  # NaN prob: blanked
    for name, iv in _variants(a, choice["threshold"]).items():
      choice["cutoff"][name] = _first_max((iv[0][t] * keep).mean(1))
  return choice


def _variants(a: _ClassArrays, threshold: int | None) -> dict[str, tuple]:
  """(IoU, non-empty) per case of the Otsu and (when chosen) the tuned-threshold masks."""
  out = {"otsu": (a.iou_otsu, a.pred_otsu)}
  if threshold is not None:
    out["tuned"] = (a.iou_thr[:, threshold], a.pred_thr[:, threshold])
  return out


def _reported(a: _ClassArrays, cfg: dict, k: int, choice: dict) -> dict:
  """The tuned protocols on the reporting half, the choices held fixed."""
  r = ~a.tune
  boot = _Boot([c for c, x in zip(a.cases, r, strict=True) if x], cfg, (k, 1))
  for (j, ti), i in choice["tau"].items():
    if i is not None:
      boot.add(("acc", j, ti), a.found[r, j, i, ti], a.nb[r])
      boot.add(("afp", j, ti), a.fp[r, j, i, ti])
  for name, (iv, pv) in _variants(a, choice["threshold"]).items():
    if name == "tuned":
      boot.add(name, (iv * pv)[r], pv[r])
      boot.add(name + "0", iv[r])
    c = choice["cutoff"].get(name)
    if c is not None:
      kv = (a.prob >= cfg["prob_cutoffs"][c]).astype(np.float64)
      boot.add(name + "_cutoff", (iv * pv * kv)[r], (pv * kv)[r])
      boot.add(name + "_cutoff0", (iv * kv)[r])
      boot.add(name + "_cutoff_pairs", (pv * kv)[r])
  return {"values": boot.run(), "n": int(r.sum()), "n_tune": int(a.tune.sum())}


def _wang_entries(a: _ClassArrays, cfg: dict, choice: dict, sweep: dict, reported: dict) -> dict:
  """acc_* and afp_* entries: the tuned tau on the reporting half, and the sweep by tau."""
  out = {}
  taus, vals, r = cfg["taus"], reported["values"], ~a.tune
  for j, kind in enumerate(KINDS):
    for ti, t in enumerate(cfg["ts"]):
      i = choice["tau"].get((j, ti))
      for what in ("acc", "afp"):
        by_tau = {
          f"{tau:g}": dict(
            zip(("value", "lo", "hi"), map(float, sweep[(what, j, i_, ti)]), strict=True)
          )
          for i_, tau in enumerate(taus)
        }
        out[f"{what}_{kind}@{t:g}"] = _entry(
          *vals.get((what, j, ti), _NAN3),
          tau=None if i is None else taus[i],
          n=reported["n"],
          n_tune=reported["n_tune"],
          n_boxes=int(a.nb[r].sum()),
          by_tau=by_tau,
        )
  return out


def _miou_entries(a: _ClassArrays, cfg: dict, choice: dict, reported: dict) -> dict:
  """miou_tuned (and the *_cutoff variants): reporting half."""
  vals, ti, r = reported["values"], choice["threshold"], ~a.tune
  thr = None if ti is None else cfg["thresholds"][ti]
  common = {"n": reported["n"], "n_tune": reported["n_tune"]}

  def entry(name, n_pairs, **extra):
    v0 = vals.get(name + "0", _NAN3)
    return _entry(
      *vals.get(name, _NAN3),
      **common,
      n_pairs=n_pairs,
      empty0=v0[0],
      empty0_lo=v0[1],
      empty0_hi=v0[2],
      **extra,
    )

  pairs = int(a.pred_thr[r, ti].sum()) if ti is not None else 0
  out = {"miou_tuned": entry("tuned", pairs, threshold=thr)}
  if cfg["prob_cutoffs"]:
    for name in ("otsu", "tuned"):
      c = choice["cutoff"].get(name)
      cut = None if c is None else cfg["prob_cutoffs"][c]
      pairs = vals.get(name + "_cutoff_pairs", _NAN3)[0] * reported["n"]
      extra = {"cutoff": cut, **({"threshold": thr} if name == "tuned" else {})}
      out[f"miou_{name}_cutoff"] = entry(
        name + "_cutoff", int(round(pairs)) if not math.isnan(pairs) else 0, **extra
      )
  return out


def score_all(
  cases: Iterable[Case | Sequence],
  maps: Mapping,
  box_space: float,
  *,
  size: int = EVAL_SIZE,
  taus: Sequence[float] = DEFAULT_TAUS,
  ts: Sequence[float] = DEFAULT_TS,
  thresholds: Sequence[float] = MIOU_THRESHOLDS,
  prob_cutoffs: Sequence[float] | None = None,
  n_boot: int = 1000,
  seed: int = 0,
  alpha: float = 0.05,
  method: str = "nearest",
  class_names: Sequence[str] | None = None,
  image_ids: Sequence[str] | None = None,
) -> dict:
  """Every protocol of the module docstring, per box class, with patient-bootstrap intervals.

  Args:
    cases: `Case`s (or (row, cls, boxes, patient, prob) tuples), e.g. `make_cases`.
    maps: {row: (n, n, K)} (an evaluation's kept maps) or {(row, cls): (n, n)}, in [0, 1];
      cases without a map are skipped (counted in settings['n_missing']).
    box_space: the side of the square the boxes' pixels refer to (`index.box_space`).
    size: evaluation grid (512, Sec 4.2); method: 'nearest' | 'bilinear' resizing.
    taus, ts: the IoBB binarization sweep and the T(IoBB) / T(IoU) thresholds.
    thresholds, prob_cutoffs: cheXlocalize's grids; prob_cutoffs=None skips the cutoff.
    n_boot: bootstrap resamples of patients (0: no intervals); seed: their seed.
    image_ids: by row; the cheXlocalize protocols' table is sorted by them (else by row), so
      `lsemil score` on the same maps draws the same replicates.

  Returns (strict-JSON-able, NaN as None): {protocol: {class name: entry}} plus 'settings'.
  Every entry has 'value', 'lo', 'hi' and 'n' (cases); see the module docstring for the
  protocols and their extra fields ('tau', 'by_tau', 'threshold', 'cutoff', 'empty0', ...).
  """
  cfg = {
    "size": int(size),
    "taus": tuple(float(t) for t in taus),
    "ts": tuple(float(t) for t in ts),
    "thresholds": tuple(float(t) for t in thresholds),
    "prob_cutoffs": tuple(float(c) for c in prob_cutoffs) if prob_cutoffs else (),
    "n_boot": int(n_boot),
    "seed": int(seed),
    "alpha": float(alpha),
    "method": method,
  }
  by_class: dict[int, tuple[list, list, list]] = {}
  missing = 0
  names = list(class_names) if class_names is not None else list(nih.CLASSES)
  side = int(round(box_space))  # the image the boxes' pixels refer to
  for c in cases:
    case = c if isinstance(c, Case) else Case(*c)
    s = _case_map(maps, case)
    if s is None:
      missing += 1
      continue
    got = by_class.setdefault(case.cls, ([], [], []))
    gt = overlap.boxes_to_mask(case.boxes, side, box_space) > 0
    # first: a non-finite map is an error naming the case, not a NaN score
    got[2].append(chexlocalize.case_scores(s, gt, f"row {case.row}, class {names[case.cls]}"))
    got[0].append(score_case(s, case, box_space, cfg))
    got[1].append(case)
  result: dict[str, Any] = {}
  for k in sorted(by_class):
    scores, cs, _ = by_class[k]
    for proto, entry in _class_results(scores, cs, cfg, k).items():
      result.setdefault(proto, {})[names[k]] = entry
  official = chexlocalize.split_results(
    [
      (c.row if image_ids is None else str(image_ids[c.row]), names[k], tuning_half(c.patient), sc)
      for k in sorted(by_class)
      for c, sc in zip(by_class[k][1], by_class[k][2], strict=True)
    ],
    cfg["n_boot"],
    cfg["seed"],
  )
  official.pop("per_image")
  result.update(official)
  result["settings"] = {
    **{key: cfg[key] for key in cfg},
    "box_space": float(box_space),
    "n_missing": missing,
    "n_cases": {names[k]: len(v[1]) for k, v in sorted(by_class.items())},
    "split": "tuning half: first byte of sha256(str(patient id)) even",
  }
  return fileio.json_safe(result)
