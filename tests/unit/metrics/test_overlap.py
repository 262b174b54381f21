"""Tests of lsemil.metrics.overlap (Sec 4.2 metrics): hand-computed cases, skimage as the
oracle."""

from __future__ import annotations

import numpy as np
import pytest

from lsemil.metrics import overlap

# ------------------------------------------------------------------------------ masks / resize


def test_boxes_to_mask_pixel_centre_convention():
  # 8x8 target from a 16-pixel source: s = 0.5. Box x=2, w=5 -> scaled [1, 3.5): centres
  # 1.5, 2.5 inside; 3.5 not (half-open). y=0, h=3 -> [0, 1.5): centres 0.5 (1.5 excluded).
  m = overlap.boxes_to_mask([(2, 0, 5, 3)], size=8, source_size=16)
  expected = np.zeros((8, 8))
  expected[0:1, 1:3] = 1
  np.testing.assert_array_equal(m, expected)
  # Brute-force definition on a random set of boxes.
  rng = np.random.default_rng(0)
  boxes = np.c_[rng.uniform(0, 12, (5, 2)), rng.uniform(0, 6, (5, 2))]
  m = overlap.boxes_to_mask(boxes, size=8, source_size=16)
  c = (np.arange(8) + 0.5) * 2  # centres in source pixels
  ref = np.zeros((8, 8), bool)
  for x, y, w, h in boxes:
    ref |= ((c[:, None] >= y) & (c[:, None] < y + h)) & ((c[None, :] >= x) & (c[None, :] < x + w))
  np.testing.assert_array_equal(m, ref.astype(float))


def test_boxes_to_mask_union_identity_and_clipping():
  m = overlap.boxes_to_mask([(0, 0, 2, 2), (1, 1, 2, 2), (3, 3, 10, 10)], size=4, source_size=4)
  expected = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], float)
  np.testing.assert_array_equal(m, expected)
  assert overlap.boxes_to_mask([], size=4, source_size=4).sum() == 0


def test_resize_saliency_nearest_is_block_repeat():
  s = np.arange(16.0).reshape(4, 4)
  np.testing.assert_array_equal(overlap.resize_saliency(s, 8), np.kron(s, np.ones((2, 2))))
  np.testing.assert_array_equal(overlap.resize_saliency(s, 4), s)


def test_resize_saliency_bilinear_matches_skimage():
  from skimage.transform import resize

  s = np.random.default_rng(0).random((4, 4))
  ours = overlap.resize_saliency(s, 16, method="bilinear")
  ref = resize(s, (16, 16), order=1, mode="edge", anti_aliasing=False)
  np.testing.assert_allclose(ours, ref, atol=1e-12)
  with pytest.raises(ValueError):
    overlap.resize_saliency(s, 8, method="cubic")


@pytest.mark.parametrize("n", [7, 16, 37])
def test_constant_map_stays_constant_under_every_resize(n):
  # map_coordinates' bilinear weights leave ~1e-16 of noise on a constant map (Otsu on its
  # min-max scaling then predicted ~235k of 262k pixels)
  for method in ("nearest", "bilinear"):
    r = overlap.resize_saliency(np.full((n, n), 0.3), 512, method)
    assert r.shape == (512, 512) and np.all(r == 0.3), method


# ------------------------------------------------------------------------------ DICE


def test_dice_hand_cases():
  g = np.zeros((4, 4))
  g[:2, :2] = 1  # |G| = 4
  assert overlap.dice(g, g) == pytest.approx(1.0)
  disjoint = np.zeros((4, 4))
  disjoint[2:, 2:] = 1
  assert overlap.dice(disjoint, g) == 0.0
  # S = 0.5 everywhere: 2 * (0.5 * 4) / (16 * 0.25 + 4) = 4 / 8
  assert overlap.dice(np.full((4, 4), 0.5), g) == pytest.approx(0.5)
  # S = 1 on G and 0.5 on one outside pixel: 2*4 / (4 + 0.25 + 4)
  s = g.copy()
  s[3, 3] = 0.5
  assert overlap.dice(s, g) == pytest.approx(8 / 8.25)
  assert overlap.dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_dice_resizes_saliency_to_mask_grid():
  s = np.array([[1.0, 0.0], [0.0, 0.0]])
  g = overlap.boxes_to_mask([(0, 0, 4, 4)], size=8, source_size=8)  # top-left quadrant
  assert overlap.dice(s, g) == pytest.approx(1.0)  # nearest: exact block replication
  assert overlap.dice(s, g, method="bilinear") < 1.0
  assert overlap.box_dice(s, [(0, 0, 512, 512)], size=8) == pytest.approx(1.0)


def test_uniform_dice_best_constant_and_given_value():
  g = np.zeros((4, 4))
  g[:1, :] = 1  # |G| = 4, A = 16 -> c* = 1/2, DICE* = 1/2
  assert overlap.uniform_dice(g) == pytest.approx(0.5)
  assert overlap.uniform_dice(g, 0.5) == pytest.approx(overlap.dice(np.full((4, 4), 0.5), g))
  assert overlap.uniform_dice(g, 1.0) == pytest.approx(2 * 4 / (16 + 4))
  # c* is the maximiser over a grid of constants, and the optimum equals sqrt(|G|/A).
  cs = np.linspace(0.01, 1, 100)
  assert max(overlap.uniform_dice(g, c) for c in cs) <= overlap.uniform_dice(g) + 1e-12
  g2 = overlap.boxes_to_mask([(0, 0, 3, 5)], size=8, source_size=8)
  assert overlap.uniform_dice(g2) == pytest.approx(np.sqrt(15 / 64))


def test_mean_box_dice_and_uniform_baseline():
  s = np.zeros((4, 4))
  s[:2, :2] = 1.0
  cases = [(s, [(0, 0, 4, 4)]), (s, [(4, 4, 4, 4)])]  # exact hit (1) and disjoint (0)
  assert overlap.mean_box_dice(cases, size=8, source_size=8) == pytest.approx(0.5)
  # both boxes cover 16 of 64 pixels: best constant DICE sqrt(1/4) each
  assert overlap.mean_uniform_dice([b for _, b in cases], size=8, source_size=8) == pytest.approx(
    0.5
  )
  assert overlap.mean_uniform_dice([[(0, 0, 4, 4)]], 1.0, 8, 8) == pytest.approx(32 / 80)
  assert np.isnan(overlap.mean_box_dice([])) and np.isnan(overlap.mean_uniform_dice([]))


# ------------------------------------------------------------------------------ IoBB / IoU


def test_predicted_boxes_components_8_connected():
  s = np.zeros((8, 8))
  s[1:3, 1:3] = 0.9
  s[3, 3] = 0.9  # touches the first blob at a corner -> same component
  s[6:8, 5:8] = 0.5
  boxes = overlap.predicted_boxes(s, tau=0.4, size=8)
  assert sorted(map(tuple, boxes.tolist())) == [(1, 1, 4, 4), (5, 6, 8, 8)]
  assert overlap.predicted_boxes(s, tau=0.95, size=8).shape == (0, 4)


def test_localization_hits_hand_cases():
  s = np.zeros((8, 8))
  s[2:4, 2:4] = 1.0  # predicted box [2,4)x[2,4), area 4
  gt = [(1, 1, 4, 4), (2, 2, 4, 2), (6, 6, 2, 2)]  # (x, y, w, h) on the same 8-pixel grid
  hits = overlap.localization_hits(s, gt, tau=0.5, size=8, source_size=8)
  # gt0 [1,5)^2 contains the prediction: IoBB 1, IoU 4/16; gt1 cols [2,6) rows [2,4):
  # inter 4, IoBB 1, IoU 4/8; gt2 disjoint: 0.
  np.testing.assert_allclose(hits["iobb"], [1.0, 1.0, 0.0])
  np.testing.assert_allclose(hits["iou"], [0.25, 0.5, 0.0])
  # The prediction larger than the GT: IoBB = |G| / |P|.
  big = np.ones((8, 8))
  np.testing.assert_allclose(
    overlap.localization_hits(big, [(0, 0, 4, 4)], 0.5, size=8, source_size=8)["iobb"], [16 / 64]
  )
  none = overlap.localization_hits(np.zeros((8, 8)), gt, 0.5, size=8, source_size=8)
  np.testing.assert_array_equal(none["iobb"], [0, 0, 0])


def test_localization_hits_scale_source_boxes():
  # A 4x4 saliency with one hot cell, evaluated at 8x8 against a 1024-pixel box of that cell.
  s = np.zeros((4, 4))
  s[1, 2] = 1.0
  hits = overlap.localization_hits(s, [(512, 256, 256, 256)], tau=0.5, size=8, source_size=1024)
  np.testing.assert_allclose(hits["iobb"], [1.0])
  np.testing.assert_allclose(hits["iou"], [1.0])


def test_iobb_accuracy_counts_boxes():
  s = np.zeros((8, 8))
  s[2:4, 2:4] = 1.0
  cases = [
    (s, [(1, 1, 4, 4), (6, 6, 2, 2)]),  # one found, one missed
    (s, [(2, 2, 4, 2)]),  # found (IoBB 1, IoU 0.5)
  ]
  kw = dict(size=8, source_size=8)
  assert overlap.iobb_accuracy(cases, tau=0.5, t=0.5, **kw) == pytest.approx(2 / 3)
  assert overlap.iobb_accuracy(cases, tau=0.5, t=0.5, kind="iou", **kw) == pytest.approx(1 / 3)
  assert overlap.iobb_accuracy(cases, tau=0.5, t=0.6, kind="iou", **kw) == 0.0
  assert np.isnan(overlap.iobb_accuracy([], tau=0.5))
  with pytest.raises(ValueError):
    overlap.iobb_accuracy(cases, tau=0.5, kind="dice")
