"""cheXlocalize's localization protocols as its official code computes them (host numpy, cv2).

Saporta et al. 2022 (Nature Machine Intelligence), github.com/rajpurkarlab/cheXlocalize; each
function names the official file and function it follows step by step:

- `resize`: the map bilinearly resized to the image's (H, W) (heatmap_to_segmentation.py
  `pkl_to_mask`, eval.py `get_map`: torch F.interpolate, mode='bilinear',
  align_corners=False). Here cv2.resize INTER_LINEAR in float64: the same half-pixel source
  coordinates with edge clamping, no antialiasing (tested against the formula). One deviation:
  a constant map stays exactly constant (bilinear weights leave ~1e-16 of rounding noise that
  min-max scaling would blow up into a mask), so it predicts nothing under every resize.
- `otsu_segmentation` (heatmap_to_segmentation.py `cam_to_segmentation`, threshold=NaN): the
  map min-max scaled, `np.uint8(255 * mask)` (truncation), cv2 Otsu (foreground uint8 > T),
  then every `cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)` contour of more than one point
  drawn as a filled PIL polygon: holes are filled, one-pixel blobs are dropped.
- `threshold_segmentation` (same function, a given threshold): scaled map > threshold.
- `iou` (eval.py `calculate_iou`): true_pos_only: NaN unless both masks are non-empty;
  otherwise NaN only when both are empty.
- `hit` (eval.py `get_hitrates`): 1 when the first `np.argmax` pixel of the resized map lies in
  the ground truth, NaN when the ground truth is empty, else 0.
- `tune_threshold` (tune_heatmap_threshold.py `tune_threshold`): the grid
  `np.arange(0.2, .8, .1)` (0.2 .. 0.8, 7 values), the true-positive-only mIoU (nanmean) per
  value, the first maximum as Python's `list.index(max(list))` picks it. The chosen value is
  written rounded to one decimal and applied so (`APPLIED_GRID`).
- `cutoff_ious`, `tune_cutoff` (tune_probability_threshold.py `compute_miou`,
  `find_threshold`; heatmap_to_segmentation.py `heatmap_to_mask`): Otsu masks blanked unless
  prob > c while tuning, all-images IoU, mIoU rounded to 3 decimals, grid `np.arange(0, .9, .1)`
  (Lung Lesion's from 0.1, `cutoff_grid`), the first maximum (pandas idxmax); the
  chosen cutoff, rounded to one decimal, blanks a mask when prob < c (kept: prob >= c).
- `bootstrap` (eval.py `bootstrap_metric`, `compute_cis`): 1,000 replicates drawing the rows
  (images) with `np.random.choice(n, n, replace=True)` after `np.random.seed(seed)`, every
  column's replicate value its NaN-skipping mean; reported: the mean of the replicates and the
  95% interval from the sorted replicates at 0-based indices int(0.025 * 1000) - 1 = 24 and
  int(0.975 * 1000) - 1 = 974 (the official code rounds these to 3 decimals; we do not).

Precision: the official code computes in torch float32; this module in float64, so a pixel
whose 255 * scaled value lies within float32 rounding of an integer may truncate differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

from lsemil.core.errors import DataError

# tune_heatmap_threshold: np.arange(0.2, .8, .1) = 0.2, 0.30000000000000004, .., 0.8000000000000003
TUNING_GRID: tuple[float, ...] = tuple(float(t) for t in np.arange(0.2, 0.8, 0.1))
APPLIED_GRID: tuple[float, ...] = tuple(round(t, 1) for t in TUNING_GRID)  # its CSV's values
CUTOFF_GRID: tuple[float, ...] = tuple(float(c) for c in np.arange(0, 0.9, 0.1))
N_REPLICATES = 1000
CONFIDENCE = 0.05


def check_finite(values, name) -> np.ndarray:
  """values as float64; a NaN or infinite value is a DataError naming `name` (an image)."""
  v = np.asarray(values, dtype=np.float64)
  if not np.all(np.isfinite(v)):
    raise DataError(f"{name}: {int((~np.isfinite(v)).sum())} non-finite value(s)")
  return v


def resize(saliency, hw: Sequence[int], name="map") -> np.ndarray:
  """An (h, w) map bilinearly resized to hw = (H, W), float64 (F.interpolate,
  align_corners=False); a constant map stays exactly constant."""
  s = check_finite(saliency, name)
  if s.ndim != 2:
    raise ValueError(f"{name}: a saliency map must be 2-D, got shape {s.shape}")
  h_out, w_out = (int(v) for v in hw)
  lo, hi = s.min(), s.max()
  if lo == hi:
    return np.full((h_out, w_out), lo)
  return cv2.resize(np.ascontiguousarray(s), (w_out, h_out), interpolation=cv2.INTER_LINEAR)


def scaled(s_resized) -> np.ndarray:
  """cam_to_segmentation's normalization: (s - min) / max(s - min); constant -> all zeros
  (the official 0 / 0 = NaN predicts nothing either way)."""
  mask = np.asarray(s_resized, dtype=np.float64)
  mask = mask - mask.min()
  top = mask.max()
  return mask / top if top > 0 else np.zeros_like(mask)


def otsu_segmentation(s_resized) -> np.ndarray:
  """cam_to_segmentation with threshold=NaN: boolean (H, W) mask."""
  return _otsu_of_scaled(scaled(s_resized))


def _otsu_of_scaled(m) -> np.ndarray:
  mask = np.uint8(255 * m)
  thresh = cv2.threshold(mask, 0, float(mask.max()), cv2.THRESH_OTSU)[1]
  cnts = cv2.findContours(thresh, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
  cnts = cnts[0] if len(cnts) == 2 else cnts[1]
  out = Image.new("1", (mask.shape[1], mask.shape[0]))
  draw = ImageDraw.Draw(out)
  for cnt in cnts:
    if len(cnt) > 1:
      draw.polygon(cnt.reshape(-1).tolist(), outline=1, fill=1)  # [x0, y0, x1, y1, ...]
  return np.array(out, dtype=bool)


def threshold_segmentation(s_resized, threshold: float) -> np.ndarray:
  """cam_to_segmentation with a threshold: scaled map > threshold."""
  return scaled(s_resized) > threshold


def iou(pred, gt, true_pos_only: bool = True) -> float:
  """eval.py calculate_iou: |P and G| / |P or G|; NaN as described in the module docstring."""
  p, g = np.asarray(pred, bool), np.asarray(gt, bool)
  return _iou_of_counts(int(p.sum()), int(g.sum()), int((p & g).sum()), true_pos_only)


def _iou_of_counts(n_p: int, n_g: int, inter: int, true_pos_only: bool) -> float:
  union = n_p + n_g - inter
  if (n_p == 0 or n_g == 0) if true_pos_only else union == 0:
    return float("nan")
  return inter / union


def threshold_ious(m, gt, thresholds) -> np.ndarray:
  """True-positive-only `iou(m > t, gt)` for each t, from counts (m: the scaled map)."""
  g = np.asarray(gt, bool)
  inside, n_g = m[g], int(g.sum())
  out = []
  for t in thresholds:
    n_p, inter = int(np.count_nonzero(m > t)), int(np.count_nonzero(inside > t))
    out.append(inter / (n_p + n_g - inter) if n_p and n_g else float("nan"))
  return np.array(out)


def hit(s_resized, gt) -> float:
  """eval.py get_hitrates: the first argmax pixel in gt -> 1; else NaN for an empty gt, 0."""
  s = np.asarray(s_resized)
  g = np.asarray(gt)
  r, c = np.unravel_index(np.argmax(s, axis=None), s.shape)
  if g[r, c] == 1:
    return 1.0
  return float("nan") if g.sum() == 0 else 0.0


def _py_first_max(values) -> int:
  """`values.index(max(values))` of a Python list: a NaN first element wins (max never
  replaces it), later NaNs are skipped."""
  v = [float(x) for x in values]
  best = 0
  for i in range(1, len(v)):
    if v[i] > v[best]:
      best = i
  return best


def _nanmean(a, axis=0) -> np.ndarray:
  """np.nanmean without the all-NaN warning (NaN there, as the official code gets)."""
  a = np.asarray(a, dtype=np.float64)
  ok = ~np.isnan(a)
  n = ok.sum(axis)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n > 0, np.where(ok, a, 0.0).sum(axis) / n, np.nan)


def tune_threshold(ious) -> int:
  """Index into TUNING_GRID: ious (images, grid) true-positive-only IoUs (NaN allowed)."""
  return _py_first_max(_nanmean(ious, 0))


def cutoff_grid(cls) -> tuple[float, ...]:
  """find_threshold's cutoffs for a class: np.arange(0, .9, .1), from 0.1 for 'Lung Lesion'."""
  return CUTOFF_GRID[1:] if cls == "Lung Lesion" else CUTOFF_GRID


def cutoff_ious(iou_all, gt_any, probs, cutoffs=CUTOFF_GRID, tuning: bool = True):
  """(images, cutoffs) all-images IoUs with the Otsu mask blanked below each cutoff.

  iou_all: `iou(otsu, gt, true_pos_only=False)` per image; gt_any: the ground truth is
  non-empty; tuning: kept when prob > c (tune_probability_threshold.compute_miou), else kept
  when prob >= c (heatmap_to_segmentation.pkl_to_mask). A blanked mask scores 0 against a
  non-empty ground truth and NaN against an empty one.
  """
  p = np.asarray(probs, np.float64)[:, None]
  c = np.asarray(cutoffs, np.float64)[None, :]
  keep = p > c if tuning else p >= c
  blank = np.where(np.asarray(gt_any, bool), 0.0, np.nan)[:, None]
  return np.where(keep, np.asarray(iou_all, np.float64)[:, None], blank)


def tune_cutoff(ious) -> int | None:
  """Index of the chosen cutoff: mIoU rounded to 3 decimals, first maximum skipping NaN
  (pandas idxmax); None when every mIoU is NaN."""
  m = np.round(_nanmean(ious, 0), 3)
  return None if np.all(np.isnan(m)) else int(np.nanargmax(m))


def bootstrap(values, n_replicates: int = N_REPLICATES, seed: int = 0, confidence=CONFIDENCE):
  """eval.py bootstrap_metric + compute_cis over the rows of values (images, columns).

  Returns (mean, lower, upper, replicates): the first three (columns,), replicates
  (n_replicates, columns); NaN where a column has no value.
  """
  v = np.asarray(values, dtype=np.float64)
  v = v[:, None] if v.ndim == 1 else v
  n = len(v)
  rng = np.random.RandomState(seed)  # the legacy stream np.random.seed + np.random.choice use
  reps = np.empty((n_replicates, v.shape[1]))
  for r in range(n_replicates):
    reps[r] = _nanmean(v[rng.choice(n, size=n, replace=True)], 0)
  ordered = np.sort(reps, axis=0)  # NaN last, as pandas sort_values
  lower = ordered[int(confidence / 2 * n_replicates) - 1]
  upper = ordered[int((1 - confidence / 2) * n_replicates) - 1]
  return _nanmean(reps, 0), lower, upper, reps


def case_scores(s_native, gt, name="map", grid: Sequence[float] = TUNING_GRID) -> dict:
  """Per-image quantities of one (image, class): s_native the model's map, gt the (H, W)
  ground-truth mask at the image's size.

  'iou_otsu' (true-positive-only), 'iou_otsu_all' (all-images), 'iou_grid' and
  'iou_applied' (true-positive-only at TUNING_GRID and at its rounded APPLIED_GRID), 'hit',
  'gt_any'.
  """
  g = np.asarray(gt, bool)
  s = resize(s_native, g.shape, name)
  m = scaled(s)
  otsu = _otsu_of_scaled(m)
  counts = (int(np.count_nonzero(otsu)), int(np.count_nonzero(g)), int(np.count_nonzero(otsu & g)))
  ious = threshold_ious(m, g, [*grid, *(round(t, 1) for t in grid)])
  return {
    "iou_otsu": _iou_of_counts(*counts, True),
    "iou_otsu_all": _iou_of_counts(*counts, False),
    "iou_grid": ious[: len(grid)],
    "iou_applied": ious[len(grid) :],
    "hit": hit(s, g),
    "gt_any": counts[1] > 0,
  }


# ----------------------------------------------------------------------------------------------
# A split's results: eval.py's table of images x classes, bootstrapped


def _summary(values, n_cases, n_replicates: int, seed: int, extra) -> list[dict]:
  """One entry per column of values (images, classes): eval.py's reported mean and interval."""
  point = _nanmean(values, 0) if len(values) else np.full(values.shape[1], np.nan)
  if n_replicates > 0 and len(values):
    mean, lo, hi, _ = bootstrap(values, n_replicates, seed)
  else:
    mean, lo, hi = point, np.full_like(point, np.nan), np.full_like(point, np.nan)
  return [
    {
      "value": float(mean[j]),
      "lo": float(lo[j]),
      "hi": float(hi[j]),
      "point": float(point[j]),
      "n": int(n_cases[j]),
      "n_pairs": int((~np.isnan(values[:, j])).sum()),
      **extra[j],
    }
    for j in range(values.shape[1])
  ]


def split_results(
  cases, n_replicates: int = N_REPLICATES, seed: int = 0, all_images: bool = False
) -> dict:
  """cheXlocalize's protocols of a split: {protocol: {class: entry}} plus 'per_image'.

  cases: (image key, class, tuning: bool, `case_scores` result[, probability]) per (image,
  class). As eval.py's table, rows are the images (sorted by key), columns the classes, NaN
  where an image has no case of the class or the value is undefined (e.g. an empty ground
  truth); the replicates draw rows, jointly for all classes. Protocols:
  'chexlocalize_miou_otsu' and 'chexlocalize_hit_rate' over every image;
  'chexlocalize_miou_tuned': the threshold tuned on the tuning images (`tune_threshold`),
  reported on the others. With all_images (the cases include images without the finding):
  'chexlocalize_miou_otsu_all' (eval.py true_pos_only=False) and, where the cases carry
  probabilities, 'chexlocalize_miou_otsu_cutoff' (the cutoff tuned on the tuning images,
  `tune_cutoff`, reported on the others). Entry: 'value' (mean of the replicates), 'lo',
  'hi', 'point' (the table's nanmean), 'n' (the images with the finding; for the all-images
  protocols every image), 'n_pairs' (defined values), and 'threshold' / 'cutoff' (None:
  nothing to tune on) where tuned.
  """
  images = sorted({c[0] for c in cases})
  classes = list(dict.fromkeys(c[1] for c in cases))
  row = {im: i for i, im in enumerate(images)}
  col = {k: j for j, k in enumerate(classes)}
  shape = (len(images), len(classes))
  table = {key: np.full(shape, np.nan) for key in ("otsu", "otsu_all", "hit", "tuned", "cut")}
  tuning = np.zeros(len(images), bool)
  by_class: dict = {k: ([], []) for k in classes}  # (tuning cases, reporting cases)
  for c in cases:
    im, k, tune, sc = c[:4]
    i, j = row[im], col[k]
    table["otsu"][i, j], table["hit"][i, j] = sc["iou_otsu"], sc["hit"]
    table["otsu_all"][i, j] = sc["iou_otsu_all"]
    tuning[i] = bool(tune)
    prob = c[4] if len(c) > 4 and c[4] is not None else np.nan
    by_class[k][0 if tune else 1].append((i, sc, float(prob)))
  thr, cut = [], []
  for k, (tune_cases, report_cases) in by_class.items():
    j = col[k]
    t = tune_threshold([sc["iou_grid"] for _, sc, _ in tune_cases]) if tune_cases else None
    thr.append({"threshold": None if t is None else APPLIED_GRID[t], "n_tune": _n_pos(tune_cases)})
    for i, sc, _ in report_cases:
      table["tuned"][i, j] = np.nan if t is None else sc["iou_applied"][t]
    probs = [p for _, _, p in tune_cases + report_cases]
    c_i = None
    if all_images and tune_cases and not np.any(np.isnan(probs)):
      c_i = tune_cutoff(_cutoff_table(tune_cases, cutoff_grid(k), True))
    cut.append({"cutoff": None if c_i is None else round(cutoff_grid(k)[c_i], 1)})
    if c_i is not None and report_cases:
      rows = [i for i, _, _ in report_cases]
      table["cut"][rows, j] = _cutoff_table(report_cases, [cut[-1]["cutoff"]], False)[:, 0]
  # n: the images with the finding (all images for the all-images protocols)
  n_pos = np.array([_n_pos(a) + _n_pos(b) for a, b in by_class.values()], np.int64)
  n_rep = np.array([_n_pos(b) for _, b in by_class.values()], np.int64)
  n_all = np.array([len(a) + len(b) for a, b in by_class.values()], np.int64)
  n_all_rep = np.array([len(b) for _, b in by_class.values()], np.int64)
  none = [{}] * len(classes)
  out = {
    "chexlocalize_miou_otsu": _summary(table["otsu"], n_pos, n_replicates, seed, none),
    "chexlocalize_miou_tuned": _summary(table["tuned"][~tuning], n_rep, n_replicates, seed, thr),
    "chexlocalize_hit_rate": _summary(table["hit"], n_pos, n_replicates, seed, none),
  }
  if all_images:
    out["chexlocalize_miou_otsu_all"] = _summary(table["otsu_all"], n_all, n_replicates, seed, none)
    if any(e["cutoff"] is not None for e in cut):
      out["chexlocalize_miou_otsu_cutoff"] = _summary(
        table["cut"][~tuning], n_all_rep, n_replicates, seed, cut
      )
  result = {p: dict(zip(classes, e, strict=True)) for p, e in out.items()}
  result["per_image"] = {"images": images, "classes": classes, "tuning": tuning, **table}
  return result


def _n_pos(cases) -> int:
  return sum(bool(sc["gt_any"]) for _, sc, _ in cases)


def _cutoff_table(cases, cutoffs, tuning: bool) -> np.ndarray:
  """`cutoff_ious` of (row, case_scores, probability) cases."""
  return cutoff_ious(
    [sc["iou_otsu_all"] for _, sc, _ in cases],
    [sc["gt_any"] for _, sc, _ in cases],
    [p for _, _, p in cases],
    cutoffs,
    tuning,
  )
