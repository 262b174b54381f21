"""Saliency maps scored as detections: COCO AP at one IoU, WSRPN's loc-acc and RoDeO (host numpy).

Boxes are per image arrays in image pixels, as WSRPN's `box_prediction_hard` and targets
(github.com/philip-mueller/wsrpn, src/metrics/detection_metrics.py): predictions (M, 6)
x, y, w, h, class index, score; truth (T, 5) x, y, w, h, class index.

- `map_boxes`: a map's boxes as `predict --boxes` derives them
  (`lsemil.metrics.localization.boxes_from_map`: the map on the 512 grid binarized at
  S >= tau, one box per 8-connected component, scaled to the image), after min-max scaling the
  map (any model's maps; WSRPN scales each class map so too,
  src/model/model_components.py `get_bboxes_from_heatmaps_`, and binarizes with > where
  boxes_from_map uses >=); the caller's score: the box's peak (scaled) saliency x the class
  probability.
- `wsrpn_split`: WSRPN's validation / test halves of the box images.
- `coco_ap`: pycocotools COCOeval's bbox AP at one IoU threshold (evaluateImg + accumulate):
  per image and class the detections sorted by score (mergesort), the first 100 kept, each
  matched greedily to the unmatched ground-truth box of highest IoU >= T (the later one on a
  tie); over all images the precision envelope read at the 101 recall points 0, 0.01, .., 1
  (np.searchsorted side='left', 0 past the last detection); AP their mean; NaN for a class
  without ground truth (COCO's -1). WSRPN itself uses bes-dev/mean_average_precision
  (mpolicy='soft', the same 101 recall points); lsemil states COCO's, which a test checks
  against pycocotools.
- `loc_acc`: WSRPN's `PRAtIoUMetric` (acc@T, src/metrics/detection_metrics.py): per class and
  image a ground-truth box is a true positive when its best IoU with a predicted box of the
  class is > T (strict); an image with neither boxes nor predictions of the class is a true
  negative; acc = (TP + TN) / (TP + TN + FP + FN), FP = predictions - TP, FN = truth - TP;
  reported per class and as the class mean (their run_ttest.py reports acc@0.3 and acc@0.5).
- `rodeo`: RoDeO (Meissen et al., MIDL 2023; github.com/FeliMe/RoDeO, rodeo/rodeo.py and
  rodeo/utils.py at cc55193, step by step): per image a Hungarian matching of predictions
  and truth on -GIoU - w [same class], w = max(0, MCC) of the image-level class multi-hot;
  localization exp(-ln2 d^2) of the centres normalised by the truth's size, shape the IoU of
  the boxes aligned at the upper left, classification max(0, MCC) of the matched pairs'
  class multi-hot; each weighted by matched / (matched + over-predicted + missed) (Eq. 5);
  total their harmonic mean (eps 1e-6). The published package (rodeometric 0.0.1) fails
  with scikit-learn >= 1.6 (`.clip` on the float matthews_corrcoef returns; fixed upstream in
  cc55193, unreleased), and a bootstrap needs per-image sums, so it is computed here; tests
  compare it with the package (its upstream fix applied).

Every metric is a ratio of per-image sums (AP: of weighted cumulative counts), so an image
bootstrap (`counts`: replicates x images) reweights per-image quantities instead of
recomputing from boxes; RoDeO's matching weight w is recomputed per replicate, and an
image is re-matched only where its matching changes between replicates' weights.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import scipy.optimize

from lsemil.metrics import localization

RECALL_GRID = np.linspace(0.0, 1.0, 101)  # COCOeval Params.recThrs
MAX_DETS = 100  # COCOeval Params.maxDets[-1]
EPS_HARMONIC = 1e-6  # rodeo.utils.harmonic_mean


def map_boxes(saliency, tau: float, image_hw) -> np.ndarray:
  """(M, 6) x, y, w, h, peak, mean of one class map: `localization.boxes_from_map` of the
  min-max scaled map at tau (peak / mean: the scaled saliency over the box's component); a
  constant map has no box."""
  scaled = localization.minmax(saliency)
  if not scaled.any():
    return np.zeros((0, 6))
  boxes = localization.boxes_from_map(scaled, tau, image_hw)
  rows = [[b["x"], b["y"], b["w"], b["h"], b["peak"], b["mean"]] for b in boxes]
  return np.array(rows, np.float64).reshape(-1, 6)


def wsrpn_split(box_images: Sequence[str], patient_of) -> tuple[set, set]:
  """(validation, test) image sets of WSRPN's split of the box images
  (src/data/cxr8.py `prepare_image_file_lists_`): box_images holds one image id per box in
  the box file's order; it is shuffled with random.Random(0), then whole patients go to
  validation while it holds fewer than half the boxes (len // 2), the rest to test.
  WSRPN walks the patients in the order of a Python set of strings, which changes with
  PYTHONHASHSEED; here the patients go in the order they first appear in the shuffled list
  (deterministic), so the halves are WSRPN's in construction, not image for image."""
  rows = list(box_images)
  random.Random(0).shuffle(rows)
  n_half = len(rows) // 2
  by_patient: dict = {}
  for im in rows:
    by_patient.setdefault(patient_of(im), []).append(im)
  valid: list = []
  test: list = []
  for ims in by_patient.values():
    (valid if len(valid) < n_half else test).extend(ims)
  return set(valid), set(test)


def _pair_areas(a, b):
  """(intersection, union, enclosing box) areas of every pair of x, y, w, h boxes."""
  a, b = np.asarray(a, np.float64)[:, None, :4], np.asarray(b, np.float64)[None, :, :4]
  lo_a, hi_a, lo_b, hi_b = (
    a[..., :2],
    a[..., :2] + a[..., 2:4],
    b[..., :2],
    b[..., :2] + b[..., 2:4],
  )
  side = np.maximum(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0)
  inter = side[..., 0] * side[..., 1]
  union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
  enc = np.maximum(np.maximum(hi_a, hi_b) - np.minimum(lo_a, lo_b), 0)
  return inter, union, enc[..., 0] * enc[..., 1]


def iou_matrix(a, b) -> np.ndarray:
  """IoU of every pair of x, y, w, h boxes, (len(a), len(b)) (pycocotools maskUtils.iou of
  bboxes, torchvision box_iou: no +1)."""
  inter, union, _ = _pair_areas(a, b)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, inter / union, 0.0)


# ----------------------------------------------------------------------------------------------
# AP (COCOeval at one IoU)


def coco_matches(dets, gts, thr: float) -> tuple[np.ndarray, np.ndarray]:
  """(scores, true positive) of one image's detections of one class, COCOeval.evaluateImg:
  dets (M, >=5) x, y, w, h, .., score in the last column; gts (T, >=4)."""
  dets = np.asarray(dets, np.float64).reshape(-1, np.shape(dets)[-1] if len(dets) else 5)
  order = np.argsort(-dets[:, -1], kind="mergesort")[:MAX_DETS]
  dets = dets[order]
  tp = np.zeros(len(dets), bool)
  if len(dets) and len(gts):
    ious = iou_matrix(dets, gts)
    used = np.zeros(len(gts), bool)
    for d in range(len(dets)):
      best, m = min(thr, 1 - 1e-10), -1
      for g in range(len(gts)):
        if used[g] or ious[d, g] < best:
          continue
        best, m = ious[d, g], g
      if m >= 0:
        used[m] = tp[d] = True
  return dets[:, -1], tp


def _ap_rows(tp, weights, n_gt) -> np.ndarray:
  """COCOeval.accumulate's AP of detections already in score order, one row per weighting:
  tp (D,) bool, weights (R, D) image multiplicities, n_gt (R,)."""
  ctp = np.cumsum(weights * tp, axis=1)
  cfp = np.cumsum(weights * ~tp, axis=1)
  out = np.full(len(weights), np.nan)
  for r in range(len(weights)):
    if n_gt[r] <= 0:
      continue
    if tp.size == 0:
      out[r] = 0.0
      continue
    rc = ctp[r] / n_gt[r]
    pr = np.maximum.accumulate((ctp[r] / (cfp[r] + ctp[r] + np.spacing(1)))[::-1])[::-1]
    idx = np.searchsorted(rc, RECALL_GRID, side="left")
    out[r] = np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0).mean()
  return out


def coco_ap(preds: Sequence, truth: Sequence, n_classes: int, thr: float, counts=None):
  """Per class AP at IoU thr (module docstring): preds, truth per image (see the module
  docstring); counts (R, images) image multiplicities of bootstrap replicates. Returns
  (n_classes,) or with counts (R, n_classes); NaN where a class has no ground truth."""
  n = len(preds)
  w = np.ones((1, n)) if counts is None else np.asarray(counts, np.float64)
  out = np.full((len(w), n_classes), np.nan)
  for k in range(n_classes):
    scores, tps, imgs, n_gt = [], [], [], np.zeros(n)
    for i, (p, t) in enumerate(zip(preds, truth, strict=True)):
      p, t = np.asarray(p).reshape(-1, 6), np.asarray(t).reshape(-1, 5)
      g = t[t[:, 4] == k]
      n_gt[i] = len(g)
      s, tp = coco_matches(p[p[:, 4] == k], g, thr)
      scores.append(s)
      tps.append(tp)
      imgs.append(np.full(len(s), i))
    s, tp, im = np.concatenate(scores), np.concatenate(tps), np.concatenate(imgs).astype(int)
    order = np.argsort(-s, kind="mergesort")
    out[:, k] = _ap_rows(tp[order], w[:, im[order]], w @ n_gt)
  return out[0] if counts is None else out


# ----------------------------------------------------------------------------------------------
# loc-acc (WSRPN PRAtIoUMetric)


def loc_acc_counts(preds: Sequence, truth: Sequence, n_classes: int, thrs: Sequence[float]):
  """Per image (n, C, len(thrs)) true positives, and (n, C) true negatives, predictions and
  ground-truth boxes, as PRAtIoUMetric.add counts them."""
  n = len(preds)
  tp = np.zeros((n, n_classes, len(thrs)))
  tn, n_pred, n_gt = np.zeros((n, n_classes)), np.zeros((n, n_classes)), np.zeros((n, n_classes))
  t = np.asarray(thrs, np.float64)
  for i, (p, g) in enumerate(zip(preds, truth, strict=True)):
    p, g = np.asarray(p).reshape(-1, 6), np.asarray(g).reshape(-1, 5)
    for k in range(n_classes):
      pk, gk = p[p[:, 4] == k], g[g[:, 4] == k]
      n_pred[i, k], n_gt[i, k] = len(pk), len(gk)
      if len(pk) == 0 or len(gk) == 0:
        tn[i, k] = float(len(pk) == len(gk))
        continue
      best = iou_matrix(pk, gk).max(axis=0)  # each truth box's best prediction
      tp[i, k] = (best[:, None] > t[None, :]).sum(axis=0)
  return tp, tn, n_pred, n_gt


def loc_acc(tp, tn, n_pred, n_gt, counts=None) -> np.ndarray:
  """acc@T per class from `loc_acc_counts`: (C, T), or with counts (R, C, T)."""
  w = np.ones((1, len(tp))) if counts is None else np.asarray(counts, np.float64)
  stp = np.einsum("ri,ikt->rkt", w, tp)
  stn, sp, sg = (np.einsum("ri,ik->rk", w, a)[..., None] for a in (tn, n_pred, n_gt))
  with np.errstate(invalid="ignore", divide="ignore"):
    acc = (stp + stn) / (stn + sp + sg - stp)
  return acc[0] if counts is None else acc


# ----------------------------------------------------------------------------------------------
# RoDeO


def mcc(tp, fp, fn, tn) -> np.ndarray:
  """sklearn.metrics.matthews_corrcoef of binary labels from their confusion counts (0 where
  undefined), elementwise."""
  tp, fp, fn, tn = (np.asarray(v, np.float64) for v in (tp, fp, fn, tn))
  t0, t1, p0, p1 = tn + fp, fn + tp, tn + fn, fp + tp
  n = t0 + t1
  cov_ytyp = (tp + tn) * n - (t0 * p0 + t1 * p1)
  both = (n**2 - (p0 * p0 + p1 * p1)) * (n**2 - (t0 * t0 + t1 * t1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(both == 0, 0.0, cov_ytyp / np.sqrt(np.where(both == 0, 1.0, both)))


def generalized_iou(a, b) -> np.ndarray:
  """rodeo.utils.generalized_box_iou of x, y, w, h boxes, (len(a), len(b))."""
  inter, union, enc = _pair_areas(a, b)
  return inter / union - (enc - union) / enc


def hungarian(p, t, class_weight: float) -> tuple[np.ndarray, np.ndarray]:
  """rodeo.utils.hungarian_matching: (prediction rows, truth rows) of the matched pairs."""
  if len(p) == 0 or len(t) == 0:
    return np.zeros(0, int), np.zeros(0, int)
  same = (p[:, 4][:, None] == t[:, 4][None, :]).astype(np.int32)
  cost = -generalized_iou(p, t) - same * class_weight
  return scipy.optimize.linear_sum_assignment(cost)


class RodeoStats:
  """Per-image sums of RoDeO's terms, (n, C) arrays by class (module docstring):
  matched pairs by truth class, same-class pairs, localization and shape sums, unmatched
  predictions by their class, missed truth by class."""

  FIELDS = ("matched", "same", "loc", "shape", "over", "missed")

  def __init__(self, n: int, n_classes: int):
    self.n_classes = n_classes
    for f in self.FIELDS:
      setattr(self, f, np.zeros((n, n_classes)))

  def set_image(self, i: int, p, t, rows, cols) -> None:
    """Image i's row from its matched pairs (prediction rows, truth rows)."""
    k = self.n_classes
    for f in self.FIELDS:
      getattr(self, f)[i] = 0.0
    mp, mt = p[rows], t[cols]
    tc = mt[:, 4].astype(int)
    np.add.at(self.matched[i], tc, 1.0)
    np.add.at(self.same[i], tc, (mp[:, 4] == mt[:, 4]).astype(float))
    size = np.concatenate([mt[:, 2:4], mt[:, 2:4]], 1)
    pn, tn = mp[:, :4] / size, mt[:, :4] / size
    d2 = ((pn[:, :2] + pn[:, 2:4] / 2 - (tn[:, :2] + tn[:, 2:4] / 2)) ** 2).sum(1)
    np.add.at(self.loc[i], tc, np.exp(-d2 * math.log(2)))
    inter = np.minimum(mp[:, 2], mt[:, 2]) * np.minimum(mp[:, 3], mt[:, 3])
    union = mp[:, 2] * mp[:, 3] + mt[:, 2] * mt[:, 3] - inter
    np.add.at(self.shape[i], tc, inter / union)
    self.over[i] = np.bincount(np.delete(p[:, 4], rows).astype(int), minlength=k)[:k]
    self.missed[i] = np.bincount(np.delete(t[:, 4], cols).astype(int), minlength=k)[:k]


def _image_multi_hot(preds, truth, n_classes):
  """(n, C) bool of the classes each image predicts / holds (RoDeO._get_class_cost_for_matching)."""
  ph = np.zeros((len(preds), n_classes), bool)
  th = np.zeros_like(ph)
  for i, (p, t) in enumerate(zip(preds, truth, strict=True)):
    ph[i, np.asarray(p)[:, 4].astype(int)] = True
    th[i, np.asarray(t)[:, 4].astype(int)] = True
  return ph, th


def _class_weight(ph, th, w) -> np.ndarray:
  """max(0, MCC) of the image-level multi-hot under image weights w (R, n): (R,)."""
  cells = [(ph & th), (ph & ~th), (~ph & th), (~ph & ~th)]
  tp, fp, fn, tn = (w @ c.sum(1) for c in cells)
  return np.maximum(0.0, mcc(tp, fp, fn, tn))


def _rodeo_scores(s: dict, k: int) -> dict[str, np.ndarray]:
  """RoDeO's components (R,) and by class (R, C) from the sums s of RodeoStats' fields under
  each replicate's image weights ({field: (R, C)}); k classes."""

  def combine(matched, same, loc, shape, over, missed):
    total = matched + over + missed
    wrong = matched - same
    cls = np.maximum(0.0, mcc(same, wrong, wrong, matched * k - 2 * matched + same))
    with np.errstate(invalid="ignore", divide="ignore"):
      out = {
        "localization": np.where(matched > 0, loc / total, np.nan),
        "shape": np.where(matched > 0, shape / total, np.nan),
        "classification": np.where(matched > 0, cls * matched / total, np.nan),
      }
    out["total"] = 3 / sum(1 / (v + EPS_HARMONIC) for v in out.values())  # harmonic_mean
    return out

  res = combine(*(s[f].sum(1) for f in RodeoStats.FIELDS))
  none = np.isnan(res["total"])  # nothing matched at all: the package's 'worst possible value'
  for v in res.values():
    v[none] = 0.0
  for name, v in combine(*(s[f] for f in RodeoStats.FIELDS)).items():
    v[none] = 0.0
    res["by_class_" + name] = v
  return res


def _matchings(p, t, weights: np.ndarray) -> tuple[list, np.ndarray]:
  """The distinct Hungarian matchings of one image over sorted weights, and the index of
  each weight's: a matching optimal at two weights is optimal between them (the optimal
  cost is concave in the weight), so the range is split only where the ends differ."""
  found: list = []
  which = np.zeros(len(weights), np.int64)

  def index(m) -> int:
    for j, f in enumerate(found):
      if all(map(np.array_equal, f, m)):
        return j
    found.append(m)
    return len(found) - 1

  def solve(lo: int, hi: int, m_lo, m_hi) -> None:
    a, b = index(m_lo), index(m_hi)
    if a == b:
      which[lo : hi + 1] = a
    elif hi - lo <= 1:
      which[lo], which[hi] = a, b
    else:
      mid = (lo + hi) // 2
      m_mid = hungarian(p, t, float(weights[mid]))
      solve(lo, mid, m_lo, m_mid)
      solve(mid, hi, m_mid, m_hi)

  last = len(weights) - 1
  solve(0, last, hungarian(p, t, float(weights[0])), hungarian(p, t, float(weights[last])))
  return found, which


def rodeo(preds: Sequence, truth: Sequence, n_classes: int, counts=None) -> dict[str, np.ndarray]:
  """RoDeO's 'total', 'localization', 'shape', 'classification' and 'by_class_*' (C,), as
  RoDeO(class_names, return_per_class=True).compute() (module docstring); with counts
  (R, images), one value per bootstrap replicate, the matching weight recomputed for each.
  A class without a matched pair is NaN in 'by_class_*' (the package's mean of nothing)."""
  preds = [np.asarray(p, np.float64).reshape(-1, 6) for p in preds]
  truth = [np.asarray(t, np.float64).reshape(-1, 5) for t in truth]
  n = len(preds)
  w = np.ones((1, n)) if counts is None else np.asarray(counts, np.float64)
  ph, th = _image_multi_hot(preds, truth, n_classes)
  unique, of_rep = np.unique(_class_weight(ph, th, w), return_inverse=True)
  # every image at the first weight, then each image whose matching changes over the
  # replicates' weights adds, per replicate, its multiplicity x (its row there - that row)
  base = RodeoStats(n, n_classes)
  first = [hungarian(p, t, float(unique[0])) for p, t in zip(preds, truth, strict=True)]
  for i in range(n):
    base.set_image(i, preds[i], truth[i], *first[i])
  sums = {f: w @ getattr(base, f) for f in RodeoStats.FIELDS}
  if len(unique) > 1:
    for i in range(n):
      if len(preds[i]) == 0 or len(truth[i]) == 0:
        continue
      found, which = _matchings(preds[i], truth[i], unique)
      if len(found) == 1:
        continue
      rows = RodeoStats(len(found), n_classes)
      for j, m in enumerate(found):
        rows.set_image(j, preds[i], truth[i], *m)
      for f in RodeoStats.FIELDS:
        delta = getattr(rows, f)[which[of_rep]] - getattr(base, f)[i]
        sums[f] += w[:, i : i + 1] * delta
  res = _rodeo_scores(sums, n_classes)
  return {name: v[0] for name, v in res.items()} if counts is None else res
