"""Localization metrics of Yao et al. 2018, Sec 4.2: boxes, masks, DICE, IoBB (numpy, no JAX).

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

Box = Sequence[float]  # (x, y, w, h)


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
  upsampling). A constant map stays exactly constant under both.
  """
  s = np.asarray(saliency, dtype=np.float64)
  if s.ndim != 2:
    raise ValueError(f"saliency must be 2-D, got shape {s.shape}")
  h, w = s.shape
  if method in ("nearest", "bilinear") and s.size and s.min() == s.max():
    # exactly constant: bilinear weights would add ~1e-16 of noise that min-max scaling blows up
    return np.full((size, size), s.flat[0])
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


def box_pair_areas(gt: np.ndarray, pred: np.ndarray):
  """Of int [c0, r0, c1, r1) boxes: the intersection of every (ground-truth, predicted) pair,
  (Mg, Mp), the ground-truth areas, (Mg, 1), and the predicted areas, (1, Mp); float64."""
  g, p = gt[:, None, :], pred[None, :, :]
  iw = np.clip(np.minimum(g[..., 2], p[..., 2]) - np.maximum(g[..., 0], p[..., 0]), 0, None)
  ih = np.clip(np.minimum(g[..., 3], p[..., 3]) - np.maximum(g[..., 1], p[..., 1]), 0, None)
  inter = (iw * ih).astype(np.float64)
  area_g = ((g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])).astype(np.float64)
  area_p = ((p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])).astype(np.float64)
  return inter, area_g, area_p


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
  inter, area_g, area_p = box_pair_areas(gt, pred)
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
