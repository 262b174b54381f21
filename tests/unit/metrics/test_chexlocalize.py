"""lsemil.metrics.chexlocalize against hand-computed cases and an independent re-implementation
of cheXlocalize's official steps (numpy half-pixel resize, numpy Otsu on the uint8 map, scipy
hole filling instead of cv2 contours + PIL polygons) on random maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage

from lsemil.core.errors import DataError
from lsemil.metrics import chexlocalize


def half_pixel_resize(s, h_out, w_out):
  """torch F.interpolate(mode='bilinear', align_corners=False), one pixel at a time."""
  h, w = s.shape
  out = np.empty((h_out, w_out))
  for i in range(h_out):
    y = max((i + 0.5) * h / h_out - 0.5, 0.0)
    y0 = int(math.floor(y))
    y1, ly = min(y0 + 1, h - 1), y - y0
    for j in range(w_out):
      x = max((j + 0.5) * w / w_out - 0.5, 0.0)
      x0 = int(math.floor(x))
      x1, lx = min(x0 + 1, w - 1), x - x0
      top = (1 - lx) * s[y0, x0] + lx * s[y0, x1]
      bottom = (1 - lx) * s[y1, x0] + lx * s[y1, x1]
      out[i, j] = (1 - ly) * top + ly * bottom
  return out


def otsu_u8(u8) -> int:
  """Otsu's threshold of a uint8 image: the first t maximizing w0 w1 (m0 - m1)^2, fg > t."""
  hist = np.bincount(u8.ravel(), minlength=256).astype(np.float64)
  best, best_t = -1.0, 0
  for t in range(256):
    w0, w1 = hist[: t + 1].sum(), hist[t + 1 :].sum()
    if w0 == 0 or w1 == 0:
      continue
    m0 = (hist[: t + 1] * np.arange(t + 1)).sum() / w0
    m1 = (hist[t + 1 :] * np.arange(t + 1, 256)).sum() / w1
    v = w0 * w1 * (m0 - m1) ** 2
    if v > best + 1e-9 * abs(best):
      best, best_t = v, t
  return best_t


def official_otsu(s_resized):
  """Scaled, truncated to uint8, Otsu; 8-connected blobs of one pixel dropped, holes filled."""
  m = s_resized - s_resized.min()
  if m.max() == 0:
    return np.zeros(m.shape, bool)
  u8 = np.uint8(255 * (m / m.max()))
  fg = u8 > otsu_u8(u8)
  lab, n = scipy.ndimage.label(fg, structure=np.ones((3, 3)))
  sizes = np.bincount(lab.ravel(), minlength=n + 1)
  fg &= sizes[lab] > 1
  return scipy.ndimage.binary_fill_holes(fg)


def test_resize_is_the_half_pixel_formula_up_and_down_non_square():
  rng = np.random.default_rng(1)
  for shape, hw in [((4, 6), (30, 50)), ((7, 5), (64, 33)), ((12, 16), (5, 7))]:
    s = rng.random(shape)
    np.testing.assert_allclose(
      chexlocalize.resize(s, hw), half_pixel_resize(s, *hw), rtol=0, atol=1e-13
    )


def test_ring_hole_is_filled_and_single_pixel_dropped():
  s = np.zeros((20, 24))
  s[4:14, 6:16] = 1.0
  s[7:11, 9:13] = 0.0  # the ring's hole (16 pixels)
  s[17, 20] = 1.0  # a lone hot pixel
  got = chexlocalize.otsu_segmentation(s)
  want = np.zeros_like(got)
  want[4:14, 6:16] = True
  np.testing.assert_array_equal(got, want)
  ring = s > 0.5
  ring[17, 20] = False
  assert chexlocalize.iou(got, ring) == pytest.approx(84 / 100)
  assert chexlocalize.iou(s > 0.5, ring) == pytest.approx(
    84 / 85
  )  # the plain threshold keeps the pixel


def test_first_argmax_tie_and_plateau():
  s = np.zeros((6, 8))
  s[2, 3] = s[5, 1] = 1.0
  g = np.zeros((6, 8))
  g[5, 1] = 1
  assert chexlocalize.hit(s, g) == 0.0  # the first maximum in C order is (2, 3)
  g[2, 3] = 1
  assert chexlocalize.hit(s, g) == 1.0
  s = np.zeros((6, 8))
  s[1:4, 2:5] = 0.7  # plateau: the first pixel is (1, 2)
  g = np.zeros((6, 8))
  g[1, 2] = 1
  assert chexlocalize.hit(s, g) == 1.0
  g[1, 2], g[2:4, 2:5] = 0, 1  # 6 of 9 plateau pixels, not the first
  assert chexlocalize.hit(s, g) == 0.0
  assert math.isnan(chexlocalize.hit(s, np.zeros((6, 8))))


@pytest.mark.parametrize("hw", [(37, 53), (7, 9), (3, 2)])
def test_constant_map_predicts_nothing(hw):
  s = np.full((7, 9), 0.3)
  r = chexlocalize.resize(s, hw)
  assert np.all(r == 0.3)
  assert not chexlocalize.otsu_segmentation(r).any()
  g = np.zeros(hw)
  g[1:, 1:] = 1
  got = chexlocalize.case_scores(s, g)
  assert math.isnan(got["iou_otsu"]) and got["iou_otsu_all"] == 0.0
  assert np.all(np.isnan(got["iou_grid"]))
  assert got["hit"] == 0.0  # the first pixel (0, 0) is outside


def test_iou_edge_cases():
  e, p = np.zeros((3, 3)), np.eye(3)
  assert math.isnan(chexlocalize.iou(e, e, True)) and math.isnan(chexlocalize.iou(e, e, False))
  assert math.isnan(chexlocalize.iou(e, p, True)) and chexlocalize.iou(e, p, False) == 0.0
  assert math.isnan(chexlocalize.iou(p, e, True)) and chexlocalize.iou(p, e, False) == 0.0
  assert chexlocalize.iou(p, np.ones((3, 3))) == pytest.approx(1 / 3)


def test_non_finite_map_names_the_image():
  s = np.ones((4, 4))
  s[1, 1] = np.nan
  with pytest.raises(DataError, match="img_7"):
    chexlocalize.resize(s, (8, 8), "img_7")


def test_grids_are_the_official_aranges():
  assert (
    len(chexlocalize.TUNING_GRID) == 7 and chexlocalize.TUNING_GRID[-1] > 0.8
  )  # 0.8000000000000003
  assert chexlocalize.APPLIED_GRID == (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
  assert chexlocalize.CUTOFF_GRID[0] == 0.0 and len(chexlocalize.CUTOFF_GRID) == 9
  assert chexlocalize.cutoff_grid("Lung Lesion") == chexlocalize.CUTOFF_GRID[1:]  # its exception
  assert chexlocalize.cutoff_grid("Edema") == chexlocalize.CUTOFF_GRID


def test_random_maps_match_an_independent_reimplementation():
  rng = np.random.default_rng(7)
  for i in range(60):
    h, w = rng.integers(3, 9, size=2)
    hh, ww = rng.integers(20, 70, size=2)
    s = rng.random((h, w)) ** rng.choice([1.0, 3.0])
    g = np.zeros((hh, ww), bool)
    r0, c0 = rng.integers(0, hh // 2), rng.integers(0, ww // 2)
    g[r0 : r0 + rng.integers(2, hh // 2), c0 : c0 + rng.integers(2, ww // 2)] = True
    ref = half_pixel_resize(s, hh, ww)
    pred = official_otsu(ref)
    got = chexlocalize.case_scores(s, g, name=f"map {i}")
    np.testing.assert_array_equal(
      chexlocalize.otsu_segmentation(chexlocalize.resize(s, (hh, ww))), pred
    )
    inter, union = (pred & g).sum(), (pred | g).sum()
    want = inter / union if pred.any() else np.nan
    np.testing.assert_allclose(got["iou_otsu"], want, rtol=0, atol=1e-9)
    m = (ref - ref.min()) / (ref.max() - ref.min())
    for t, v in zip(chexlocalize.TUNING_GRID, got["iou_grid"], strict=True):
      p = m > t
      np.testing.assert_allclose(v, (p & g).sum() / (p | g).sum() if p.any() else np.nan, atol=1e-9)
    first = np.unravel_index(np.argmax(ref), ref.shape)
    assert got["hit"] == float(g[first])


def test_tune_threshold_is_list_index_of_max():
  ious = np.array([[0.1, 0.3, 0.3, np.nan], [np.nan, 0.5, 0.5, np.nan]])
  mious = [np.nanmean(c) if not np.all(np.isnan(c)) else np.nan for c in ious.T]
  assert chexlocalize.tune_threshold(ious) == mious.index(max(mious)) == 1
  ious = np.array([[np.nan, 0.9], [np.nan, 0.9]])
  assert chexlocalize.tune_threshold(ious) == 0  # a leading NaN wins in Python's max


def test_cutoff_tuned_with_gt_applied_with_ge():
  iou_all = np.array([0.6, 0.2, 0.4, 0.5])
  gt_any = np.array([True, False, True, True])
  probs = np.array([0.3, 0.3, 0.1, 0.8])
  tuned = chexlocalize.cutoff_ious(iou_all, gt_any, probs, (0.0, 0.3), tuning=True)
  applied = chexlocalize.cutoff_ious(iou_all, gt_any, probs, (0.0, 0.3), tuning=False)
  # prob 0.3 at cutoff 0.3: blanked while tuning (>), kept when applied (>=)
  np.testing.assert_array_equal(tuned[:, 1], [0.0, np.nan, 0.0, 0.5])
  np.testing.assert_array_equal(applied[:, 1], [0.6, 0.2, 0.0, 0.5])
  # mIoU 0.425 vs 0.167: the first cutoff; rounding to 3 decimals makes near-ties ties
  assert chexlocalize.tune_cutoff(tuned) == 0
  assert chexlocalize.tune_cutoff(np.array([[0.1001, 0.1004]])) == 0
  assert chexlocalize.tune_cutoff(np.array([[np.nan, 0.1]])) == 1


def test_bootstrap_is_eval_py():
  rng = np.random.default_rng(3)
  v = rng.random((23, 3))
  v[rng.random(v.shape) < 0.3] = np.nan
  mean, lo, hi, reps = chexlocalize.bootstrap(v, n_replicates=200, seed=5)
  np.random.seed(5)  # eval.py: np.random.seed(args.seed) then np.random.choice per replicate
  want = []
  for _ in range(200):
    ids = np.random.choice(len(v), size=len(v), replace=True)
    want.append([np.nanmean(v[ids, k]) for k in range(3)])
  want = np.array(want)
  np.testing.assert_allclose(reps, want, rtol=0, atol=1e-12)
  for k in range(3):
    col = sorted(want[:, k])
    assert lo[k] == pytest.approx(col[int(0.025 * 200) - 1], abs=1e-12)
    assert hi[k] == pytest.approx(col[int(0.975 * 200) - 1], abs=1e-12)
    assert mean[k] == pytest.approx(np.mean(col), abs=1e-12)
