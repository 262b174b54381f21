"""Evaluation metrics of Yao et al. 2018, Sec 4.2 (host-side numpy, no JAX).

Classification (Sec 4.2, Table 3):
  * `roc_auc` - exact, tie-aware ROC AUC via the Mann-Whitney U statistic with mid-ranks
    (equal to sklearn.metrics.roc_auc_score); NaN when a class lacks positives or negatives.
  * `per_class_auc`, `mean_auc` - the 14 per-class AUCs and their mean over defined classes.
  * `bootstrap_auc_ci` - percentile bootstrap 95% intervals, resampling patients (clusters).

Localization:
  * `boxes_to_mask`, `resize_saliency` - ground truth G and saliency S on the 512x512 grid.
  * `dice` / `box_dice` - the continuous DICE = 2*sum(SG) / (sum(S^2) + sum(G^2)) of Sec 4.2.
  * `uniform_dice` - DICE of a constant saliency map, the "uniform map" baseline.
  * `mean_box_dice`, `mean_uniform_dice` - their means over a class's test cases (Table 3).
  * `localization_hits`, `iobb_accuracy` - IoBB / IoU accuracy of Wang et al. 2017
    (ChestX-ray8, CVPR), used in Table 2 at T(IoBB) = 0.5.

Pixel convention shared by every box function: a box (x, y, w, h) given in `source_size`
pixels (NIH boxes are in 1024x1024 image pixels) is scaled by s = size / source_size and covers
the target pixels whose centres lie in the half-open scaled box, i.e. column j is covered iff
x*s <= j + 0.5 < (x + w)*s (rows likewise). A box too thin to contain any pixel centre covers
nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.ndimage
import scipy.sparse
import scipy.stats

Box = Sequence[float]  # (x, y, w, h)


# ----------------------------------------------------------------------------------------------
# Classification: AUC


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
  lo = np.full(s.shape[1], np.nan)
  hi = np.full(s.shape[1], np.nan)
  for k in range(s.shape[1]):
    a = aucs[:, k][~np.isnan(aucs[:, k])]
    if a.size:
      lo[k], hi[k] = np.percentile(a, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return lo, hi


# ----------------------------------------------------------------------------------------------
# Localization: masks, resizing, DICE


def _pixel_ranges(boxes, size: int, source_size: float) -> np.ndarray:
  """Boxes (x, y, w, h) in source pixels -> int (M, 4) [col0, row0, col1, row1), clipped.

  Column j is covered iff x*s <= j + 0.5 < (x+w)*s, s = size / source_size, i.e.
  j in [ceil(x*s - 0.5), ceil((x+w)*s - 0.5)).
  """
  b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
  s = size / float(source_size)
  lo = np.ceil(b[:, :2] * s - 0.5)
  hi = np.ceil((b[:, :2] + b[:, 2:]) * s - 0.5)
  r = np.clip(np.concatenate([lo, hi], axis=1), 0, size).astype(np.int64)
  r[:, 2:] = np.maximum(r[:, 2:], r[:, :2])  # empty rather than negative extent
  return r


def boxes_to_mask(boxes, size: int = 512, source_size: float = 1024) -> np.ndarray:
  """Union of boxes (x, y, w, h) in `source_size` pixels as a (size, size) float mask of 0/1.

  Rounding: a target pixel is inside a box when its centre lies in the scaled half-open box
  (see the module docstring). With size = source_size the mask is exactly
  [y, y+h) x [x, x+w) for integer boxes. This is G of Sec 4.2 ("the ground truth binary
  bounding box downsampled to 512x512").
  """
  mask = np.zeros((size, size), dtype=np.float64)
  for c0, r0, c1, r1 in _pixel_ranges(boxes, size, source_size):
    mask[r0:r1, c0:c1] = 1.0
  return mask


def resize_saliency(saliency, size: int = 512, method: str = "nearest") -> np.ndarray:
  """Resize an (h, w) saliency map to (size, size) float64.

  'nearest': target pixel i takes source pixel floor((i + 0.5) h / size) - for an integer
  factor this is the block replication the model uses to upsample S (np.repeat).
  'bilinear': half-pixel-centre linear interpolation with edge clamping (align_corners=False,
  as skimage.transform.resize(order=1, mode='edge') and jax.image.resize 'linear' when
  upsampling).
  """
  s = np.asarray(saliency, dtype=np.float64)
  if s.ndim != 2:
    raise ValueError(f"saliency must be 2-D, got shape {s.shape}")
  h, w = s.shape
  if method == "nearest":
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return s[np.ix_(rows, cols)]
  if method == "bilinear":
    rows = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
    cols = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return scipy.ndimage.map_coordinates(s, [rr, cc], order=1, mode="nearest")
  raise ValueError(f"method must be 'nearest' or 'bilinear', got {method!r}")


def dice(saliency, mask, method: str = "nearest") -> float:
  """Continuous DICE = 2 sum(S G) / (sum(S^2) + sum(G^2)) of Sec 4.2.

  S: the class's probabilistic saliency map, resized to mask's shape with `method` when
  shapes differ (the paper evaluates at 512x512, the model input size). G: the binary
  ground-truth mask (e.g. `boxes_to_mask`). Returns 1.0 when S and G are both all zero.
  """
  g = np.asarray(mask, dtype=np.float64)
  s = np.asarray(saliency, dtype=np.float64)
  if s.shape != g.shape:
    if g.shape[0] != g.shape[1]:
      raise ValueError(f"cannot resize saliency {s.shape} to non-square mask {g.shape}")
    s = resize_saliency(s, g.shape[0], method)
  den = float((s * s).sum() + (g * g).sum())
  if den == 0.0:
    return 1.0
  return 2.0 * float((s * g).sum()) / den


def box_dice(
  saliency, boxes, size: int = 512, source_size: float = 1024, method: str = "nearest"
) -> float:
  """DICE of a saliency map against the union of ground-truth boxes (x, y, w, h) at size^2."""
  return dice(saliency, boxes_to_mask(boxes, size, source_size), method)


def uniform_dice(mask, value: float | None = None) -> float:
  """DICE of the constant map S = c against the binary mask G ("uniform saliency map").

  With |G| = sum(G) and A the number of pixels, DICE(c) = 2 c |G| / (c^2 A + |G|).
  d/dc = 0 gives c^2 A = |G|, so the best constant is c* = sqrt(|G| / A) (always in [0, 1])
  and DICE(c*) = sqrt(|G| / A): the square root of the box's area fraction. value=None uses c*;
  otherwise c = value (e.g. 1.0 for an all-ones map, giving 2|G| / (A + |G|)).
  """
  g = np.asarray(mask, dtype=np.float64)
  area = float(g.size)
  fg = float((g * g).sum())
  c = np.sqrt(fg / area) if value is None else float(value)
  den = c * c * area + fg
  return 1.0 if den == 0.0 else 2.0 * c * float(g.sum()) / den


def mean_box_dice(
  cases: Iterable[tuple[np.ndarray, Sequence[Box]]],
  size: int = 512,
  source_size: float = 1024,
  method: str = "nearest",
) -> float:
  """Mean `box_dice` over (saliency of the class, that class's boxes on the image) cases.

  One case per (test image, box class): G is the union of the image's boxes of that class.
  This is a Table 3 DICE cell. NaN when there are no cases.
  """
  d = [box_dice(s, b, size, source_size, method) for s, b in cases]
  return float(np.mean(d)) if d else float("nan")


def mean_uniform_dice(
  boxes_per_case: Iterable[Sequence[Box]],
  value: float | None = None,
  size: int = 512,
  source_size: float = 1024,
) -> float:
  """Mean `uniform_dice` over the same cases (only their boxes): the uniform-map baseline."""
  d = [uniform_dice(boxes_to_mask(b, size, source_size), value) for b in boxes_per_case]
  return float(np.mean(d)) if d else float("nan")


# ----------------------------------------------------------------------------------------------
# Localization: IoBB / IoU accuracy (Wang et al. 2017)


def predicted_boxes(saliency, tau: float, size: int = 512, method: str = "nearest") -> np.ndarray:
  """Bounding boxes of the connected components of {S >= tau} at size x size.

  Components use 8-connectivity (pixels touching at a corner belong to one blob). Returns
  int (M, 4) [col0, row0, col1, row1) in target pixels, M = 0 when nothing reaches tau.
  """
  s = resize_saliency(saliency, size, method)
  lab, _ = scipy.ndimage.label(s >= tau, structure=np.ones((3, 3), dtype=bool))
  objs = [o for o in scipy.ndimage.find_objects(lab) if o is not None]
  return np.array(
    [[o[1].start, o[0].start, o[1].stop, o[0].stop] for o in objs], dtype=np.int64
  ).reshape(-1, 4)


def localization_hits(
  saliency,
  gt_boxes,
  tau: float,
  size: int = 512,
  source_size: float = 1024,
  method: str = "nearest",
) -> dict[str, np.ndarray]:
  """Best IoBB and IoU reached by any predicted box, for each ground-truth box.

  S (resized to size x size) is binarized at S >= tau; the predicted boxes are the bounding
  boxes of its connected components (`predicted_boxes`). For a ground-truth box G (pixel
  region as in `boxes_to_mask`) and a predicted box P, IoBB = |G ∩ P| / |P| (intersection over
  the detected bounding box, Wang et al. 2017) and IoU = |G ∩ P| / |G ∪ P|. Returns
  {'iobb': (M,), 'iou': (M,)} for the M ground-truth boxes, 0 where nothing is predicted.
  """
  gt = _pixel_ranges(gt_boxes, size, source_size)
  pred = predicted_boxes(saliency, tau, size, method)
  if len(pred) == 0 or len(gt) == 0:
    z = np.zeros(len(gt))
    return {"iobb": z, "iou": z.copy()}
  g, p = gt[:, None, :], pred[None, :, :]
  iw = np.clip(np.minimum(g[..., 2], p[..., 2]) - np.maximum(g[..., 0], p[..., 0]), 0, None)
  ih = np.clip(np.minimum(g[..., 3], p[..., 3]) - np.maximum(g[..., 1], p[..., 1]), 0, None)
  inter = (iw * ih).astype(np.float64)
  area_g = ((g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])).astype(np.float64)
  area_p = ((p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])).astype(np.float64)
  iobb = inter / area_p
  union = area_g + area_p - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, inter / union, 0.0)
  return {"iobb": iobb.max(axis=1), "iou": iou.max(axis=1)}


def iobb_accuracy(
  cases: Iterable[tuple[np.ndarray, Sequence[Box]]],
  tau: float,
  t: float = 0.5,
  kind: str = "iobb",
  size: int = 512,
  source_size: float = 1024,
  method: str = "nearest",
) -> float:
  """Localization accuracy of Wang et al. 2017 at T(kind) = t (Table 2 uses IoBB, t = 0.5).

  cases: (saliency of the class, that class's ground-truth boxes) per test image. A box is
  correctly localized when some predicted box reaches kind >= t; accuracy = found / total
  boxes. NaN when there are no boxes.
  """
  if kind not in ("iobb", "iou"):
    raise ValueError(f"kind must be 'iobb' or 'iou', got {kind!r}")
  found = total = 0
  for saliency, boxes in cases:
    best = localization_hits(saliency, boxes, tau, size, source_size, method)[kind]
    found += int((best >= t).sum())
    total += best.size
  return found / total if total else float("nan")
