"""lsemil.metrics.localization: every protocol against hand-computed cases, Otsu against skimage, AP
against sklearn, tuning blind to the reporting half, patient bootstrap, predict's boxes.

Hand cases live on a 16 x 16 grid with boxes given in a 32-pixel box space (scale 1/2), and
use a non-square, off-centre box: box (x=10, y=4, w=8, h=6) covers grid columns 5..8 and rows
2..4, so a transposed implementation fails every assertion.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage
import skimage.filters
import sklearn.metrics

from lsemil.core.errors import DataError
from lsemil.metrics import chexlocalize, localization, overlap
from lsemil.reporting import paper_tables

SIZE, SPACE = 16, 32
BOX = (10.0, 4.0, 8.0, 6.0)  # grid rows 2..4, columns 5..8 (12 pixels)
TUNE_PATIENT, REPORT_PATIENT = 2, 1  # localization.tuning_half(2) is True, (1) is False


def grid_mask(rows, cols) -> np.ndarray:
  m = np.zeros((SIZE, SIZE))
  m[rows[0] : rows[1], cols[0] : cols[1]] = 1.0
  return m


def score(s, boxes, **kw) -> dict:
  """score_all of one map on two identical cases: one per half (class 'A')."""
  cases = [
    localization.Case(0, 0, tuple(boxes), TUNE_PATIENT, 0.9),
    localization.Case(1, 0, tuple(boxes), REPORT_PATIENT, 0.9),
  ]
  maps = {(0, 0): s, (1, 0): s}
  kw = {"size": SIZE, "n_boot": 20, "class_names": ["A"], **kw}
  return localization.score_all(cases, maps, SPACE, **kw)


def values(res: dict) -> dict:
  return {p: v["A"]["value"] for p, v in res.items() if p != "settings"}


def test_tuning_half_is_deterministic_and_patientwise():
  assert localization.tuning_half(TUNE_PATIENT) and not localization.tuning_half(REPORT_PATIENT)
  assert localization.tuning_half(np.int64(2)) == localization.tuning_half("2")
  halves = [localization.tuning_half(p) for p in range(2000)]
  assert 0.45 < np.mean(halves) < 0.55


def test_grid_box_orientation():
  g = overlap.boxes_to_mask([BOX], SIZE, SPACE)
  np.testing.assert_array_equal(g, grid_mask((2, 5), (5, 9)))


def test_exact_hit_map():
  v = values(score(grid_mask((2, 5), (5, 9)), [BOX]))
  assert v["dice"] == pytest.approx(1.0)
  for t in localization.DEFAULT_TS:
    assert v[f"acc_iobb@{t:g}"] == 1.0 and v[f"acc_iou@{t:g}"] == 1.0
    assert v[f"afp_iobb@{t:g}"] == 0.0 and v[f"afp_iou@{t:g}"] == 0.0
  assert v["miou_otsu_float"] == 1.0 and v["miou_tuned"] == 1.0
  assert v["hit_rate_expected"] == 1.0 and v["energy"] == 1.0 and v["auprc"] == pytest.approx(1.0)


def test_map_off_by_one_pixel():
  # One column to the right: intersection 3 x 3 = 9 of |G| = |P| = 12, union 15.
  res = score(grid_mask((2, 5), (6, 10)), [BOX])
  v = values(res)
  assert v["dice"] == pytest.approx(2 * 9 / 24)
  assert v["acc_iobb@0.5"] == 1.0 and v["acc_iobb@0.75"] == 1.0 and v["acc_iobb@0.9"] == 0.0
  assert v["acc_iou@0.5"] == 1.0 and v["acc_iou@0.75"] == 0.0
  assert v["afp_iobb@0.75"] == 0.0 and v["afp_iobb@0.9"] == 1.0 and v["afp_iou@0.75"] == 1.0
  assert v["miou_otsu_float"] == pytest.approx(9 / 15) and v["miou_tuned"] == pytest.approx(9 / 15)
  assert res["miou_otsu_float"]["A"]["empty0"] == pytest.approx(9 / 15)
  assert v["hit_rate_expected"] == pytest.approx(9 / 12)  # ties: 9 of the 12 maxima inside
  assert v["energy"] == pytest.approx(9 / 12)
  # AP: threshold 1 -> recall 9/12 at precision 9/12; threshold 0 -> the rest at 12/256.
  assert v["auprc"] == pytest.approx(0.75 * 0.75 + 0.25 * 12 / 256)
  assert res["auprc"]["A"]["base_rate"] == pytest.approx(12 / 256)
  # The sweep: every tau gives the same boxes for a binary map.
  by_tau = res["acc_iou@0.75"]["A"]["by_tau"]
  assert set(by_tau) == {f"{t:g}" for t in localization.DEFAULT_TAUS}
  assert all(e["value"] == 0.0 for e in by_tau.values())


def test_transposed_map_misses():
  # The same box with x and y swapped (rows 5..8, columns 2..4) overlaps G in no pixel.
  v = values(score(grid_mask((5, 9), (2, 5)), [BOX]))
  assert v["dice"] == 0.0 and v["hit_rate_expected"] == 0.0 and v["acc_iobb@0.1"] == 0.0


def test_empty_map():
  res = score(np.zeros((SIZE, SIZE)), [BOX])
  v = values(res)
  assert v["dice"] == 0.0
  assert v["acc_iobb@0.1"] == 0.0 and v["afp_iobb@0.1"] == 0.0
  assert v["miou_otsu_float"] is None  # no non-empty prediction to average
  assert (
    res["miou_otsu_float"]["A"]["empty0"] == 0.0 and res["miou_otsu_float"]["A"]["n_pairs"] == 0
  )
  assert res["miou_tuned"]["A"]["empty0"] == 0.0
  assert v["hit_rate_expected"] == 0.0 and v["energy"] == 0.0
  assert v["auprc"] == pytest.approx(12 / 256)  # one tie group: precision = base rate
  assert v["dice"] < res["dice"]["A"]["constant"] == pytest.approx(np.sqrt(12 / 256))


def test_two_boxes_one_found():
  a, b = (2.0, 2.0, 6.0, 4.0), (20.0, 18.0, 8.0, 10.0)  # grid: 2 x 3 = 6 px and 5 x 4 = 20 px
  s = grid_mask((1, 3), (1, 4))  # exactly box a
  res = score(s, [a, b])
  v = values(res)
  assert v["dice"] == pytest.approx(2 * 6 / (6 + 26))
  for t in localization.DEFAULT_TS:
    assert v[f"acc_iobb@{t:g}"] == 0.5 and v[f"afp_iobb@{t:g}"] == 0.0
  assert res["acc_iobb@0.5"]["A"]["n_boxes"] == 2  # the reporting case's boxes
  assert v["miou_otsu_float"] == pytest.approx(6 / 26)
  assert v["hit_rate_expected"] == 1.0 and v["energy"] == 1.0
  assert v["auprc"] == pytest.approx(6 / 26 + 20 / 26 * 26 / 256)
  # A map with both boxes finds both; a third blob far away is one false positive.
  s2 = s + grid_mask((9, 14), (10, 14)) + grid_mask((12, 15), (0, 2))
  v2 = values(score(s2, [a, b]))
  assert v2["acc_iobb@0.5"] == 1.0 and v2["afp_iobb@0.5"] == 1.0


def test_coarse_map_is_upsampled_nearest():
  # An 8 x 8 map: each cell covers 2 x 2 grid pixels; cell rows 1..2, columns 3..4 -> grid
  # rows 2..5, columns 6..9: 3 x 3 = 9 of G's 12 pixels, |P| = 16.
  s = np.zeros((8, 8))
  s[1:3, 3:5] = 1.0
  v = values(score(s, [BOX]))
  assert v["dice"] == pytest.approx(2 * 9 / (16 + 12))
  assert v["energy"] == pytest.approx(9 / 16)


def test_wang_counts_match_metrics_localization_hits():
  rng = np.random.default_rng(0)
  boxes = [(4.0, 6.0, 10.0, 8.0), (18.0, 2.0, 6.0, 20.0), (1.0, 25.0, 12.0, 5.0)]
  ranges = localization.gt_ranges(boxes, SIZE, SPACE)
  for seed in range(5):
    s = scipy.ndimage.gaussian_filter(rng.random((SIZE, SIZE)), 1.5)
    s = localization.minmax(s)
    found, fp = localization.wang_counts(
      s, ranges, localization.DEFAULT_TAUS, localization.DEFAULT_TS, SIZE
    )
    for i, tau in enumerate(localization.DEFAULT_TAUS):
      hits = overlap.localization_hits(s, boxes, tau, SIZE, SPACE)
      n_pred = len(overlap.predicted_boxes(s, tau, SIZE))
      for j, kind in enumerate(localization.KINDS):
        for ti, t in enumerate(localization.DEFAULT_TS):
          assert found[j, i, ti] == (hits[kind] >= t).sum(), (seed, tau, kind, t)
          assert 0 <= fp[j, i, ti] <= n_pred


def test_grid_boxes_on_the_small_map_equal_predicted_boxes_on_the_grid():
  rng = np.random.default_rng(8)
  for n, size in ((8, 64), (16, 64), (32, 512), (12, 64)):  # 12 does not divide 64
    s = localization.minmax(scipy.ndimage.gaussian_filter(rng.random((n, n)), 1.0))
    for tau in (0.3, 0.5, 0.7):
      want = overlap.predicted_boxes(overlap.resize_saliency(s, size), tau, size)
      np.testing.assert_array_equal(localization.grid_boxes(s, tau, size), want)


def test_otsu_equals_skimage():
  rng = np.random.default_rng(1)
  images = [
    rng.random((32, 32)),
    np.concatenate([rng.normal(0.2, 0.05, 500), rng.normal(0.8, 0.1, 300)]).reshape(20, 40),
    np.round(rng.random((16, 16)) * 7) / 7,  # heavy ties
    localization.minmax(scipy.ndimage.gaussian_filter(rng.random((64, 64)), 3)),
    np.array([[0.0, 1.0], [1.0, 1.0]]),
  ]
  for im in images:
    assert localization.otsu_threshold(im) == pytest.approx(
      float(skimage.filters.threshold_otsu(im))
    )
  assert localization.otsu_threshold(np.full((4, 4), 0.3)) == 0.3


def test_average_precision_equals_sklearn():
  rng = np.random.default_rng(2)
  for _ in range(5):
    y = rng.random(300) < 0.2
    s = np.round(rng.random(300), 1)  # ties
    w = rng.integers(1, 4, 300).astype(float)
    assert localization.average_precision(y, s) == pytest.approx(
      sklearn.metrics.average_precision_score(y, s)
    )
    assert localization.average_precision(y, s, w) == pytest.approx(
      sklearn.metrics.average_precision_score(y, s, sample_weight=w)
    )
  assert np.isnan(localization.average_precision(np.zeros(5), np.arange(5)))


def test_pixel_auprc_equals_sklearn_on_pooled_pixels():
  rng = np.random.default_rng(3)
  cases, maps, ys, ss = [], {}, [], []
  for r in range(6):
    box = (float(rng.integers(0, 20)), float(rng.integers(0, 20)), 8.0, 6.0)
    s = np.round(localization.minmax(scipy.ndimage.gaussian_filter(rng.random((SIZE, SIZE)), 2)), 3)
    cases.append(localization.Case(r, 0, (box,), r, 0.5))
    maps[(r, 0)] = s
    ys.append(overlap.boxes_to_mask([box], SIZE, SPACE).ravel())
    ss.append(s.ravel())
  res = localization.score_all(cases, maps, SPACE, size=SIZE, n_boot=0, class_names=["A"])
  want = sklearn.metrics.average_precision_score(np.concatenate(ys), np.concatenate(ss))
  assert res["auprc"]["A"]["value"] == pytest.approx(want, abs=1e-9)


def graded_cases(n_patients: int, seed: int, poison=None):
  """Many patients with blurred, noisy maps of their box: tuned choices are interior.

  A poisoned patient's map instead makes the lowest grid values best: 0.25 on its box with
  one pixel at 1 (so only a min-max threshold of 0.2 and taus of 0.1 or 0.2 recover the box).
  """
  rng = np.random.default_rng(seed)
  cases, maps = [], {}
  for p in range(n_patients):
    x, y = float(rng.integers(0, 16)), float(rng.integers(0, 16))
    box = (x, y, float(rng.integers(6, 16)), float(rng.integers(6, 16)))
    g = overlap.boxes_to_mask([box], SIZE, SPACE)
    s = scipy.ndimage.gaussian_filter(g, rng.uniform(0.5, 3)) + 0.3 * rng.random((SIZE, SIZE))
    s = localization.minmax(s)
    if poison is not None and poison(p):
      s = 0.25 * g
      s.flat[np.flatnonzero(g)[0]] = 1.0
    cases.append(localization.Case(p, 0, (box,), p, float(rng.random())))
    maps[(p, 0)] = s
  return cases, maps


def tuned_choices(res):
  keep = ("miou_tuned", "miou_otsu_cutoff", "miou_tuned_cutoff", "acc_iobb@0.5", "acc_iou@0.25")
  keep += ("chexlocalize_miou_tuned",)
  return {k: {f: res[k]["A"].get(f) for f in ("threshold", "cutoff", "tau")} for k in keep}


def test_tuning_never_sees_the_reporting_half():
  kw = {"size": SIZE, "n_boot": 0, "class_names": ["A"], "prob_cutoffs": localization.PROB_CUTOFFS}
  clean = localization.score_all(*graded_cases(60, 4), SPACE, **kw)
  report = lambda p: not localization.tuning_half(p)  # noqa: E731
  poisoned = localization.score_all(*graded_cases(60, 4, poison=report), SPACE, **kw)
  assert tuned_choices(poisoned) == tuned_choices(clean)
  assert poisoned["miou_tuned"]["A"]["value"] != clean["miou_tuned"]["A"]["value"]
  # ...while poisoning the tuning half does move the choices.
  tuned = localization.score_all(*graded_cases(60, 4, poison=localization.tuning_half), SPACE, **kw)
  assert tuned_choices(tuned) != tuned_choices(clean)
  n = clean["miou_tuned"]["A"]
  assert n["n"] + n["n_tune"] == 60 and n["n"] > 15 and n["n_tune"] > 15
  # The reported mIoU is the reporting half's alone, at the tuned threshold.
  cases, maps = graded_cases(60, 4)
  t = clean["miou_tuned"]["A"]["threshold"]
  ious = []
  for c in cases:
    pred = localization.minmax(maps[(c.row, 0)]) > t
    if not localization.tuning_half(c.patient) and pred.any():
      ious.append(localization.iou(pred, overlap.boxes_to_mask(c.boxes, SIZE, SPACE) > 0))
  assert clean["miou_tuned"]["A"]["value"] == pytest.approx(np.mean(ious))


def test_chexlocalize_protocols_are_eval_py_tables():
  # Per case: the official steps at the 32 x 32 image; the table of rows x one class, the tuned
  # threshold and eval.py's bootstrap written out here.
  cases, maps = graded_cases(30, 8)
  res = localization.score_all(cases, maps, SPACE, size=SIZE, n_boot=50, seed=4, class_names=["A"])
  rows = sorted(cases, key=lambda c: c.row)
  tune = np.array([localization.tuning_half(c.patient) for c in rows])
  otsu, hits, grid, applied = [], [], [], []
  for c in rows:
    g = overlap.boxes_to_mask(c.boxes, SPACE, SPACE) > 0
    s = chexlocalize.resize(maps[(c.row, 0)], (SPACE, SPACE))
    otsu.append(chexlocalize.iou(chexlocalize.otsu_segmentation(s), g))
    hits.append(float(g.flat[np.argmax(s)]))
    m = (s - s.min()) / (s - s.min()).max()
    grid.append([chexlocalize.iou(m > t, g) for t in np.arange(0.2, 0.8, 0.1)])
    applied.append([chexlocalize.iou(m > t, g) for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)])
  mious = list(np.nanmean(np.array(grid)[tune], axis=0))
  best = mious.index(max(mious))
  tuned = np.array(applied)[~tune, best]

  def eval_py(v):
    np.random.seed(4)
    reps = sorted(np.nanmean(v[np.random.choice(len(v), len(v))]) for _ in range(50))
    return np.mean(reps), reps[int(0.025 * 50) - 1], reps[int(0.975 * 50) - 1]

  for name, v in [("miou_otsu", otsu), ("hit_rate", hits), ("miou_tuned", tuned)]:
    e = res[f"chexlocalize_{name}"]["A"]
    assert e["point"] == pytest.approx(np.nanmean(v), abs=1e-12), name
    assert (e["value"], e["lo"], e["hi"]) == pytest.approx(eval_py(np.array(v)), abs=1e-12)
  assert res["chexlocalize_miou_tuned"]["A"]["threshold"] == round(0.2 + 0.1 * best, 1)
  assert res["chexlocalize_miou_tuned"]["A"]["n"] == int((~tune).sum())


def test_constant_map_predicts_nothing_under_bilinear_resizing():
  res = score(np.full((7, 7), 0.4), [BOX], method="bilinear")
  assert res["miou_otsu_float"]["A"]["n_pairs"] == 0 and res["miou_tuned"]["A"]["empty0"] == 0
  assert res["chexlocalize_miou_otsu"]["A"]["n_pairs"] == 0


def test_non_finite_map_is_an_error_naming_the_case():
  s = grid_mask((2, 5), (5, 9))
  s[0, 0] = np.nan
  with pytest.raises(DataError, match="row 0, class A"):
    score(s, [BOX])


def test_bootstrap_resamples_patients():
  cases, maps = graded_cases(40, 5)
  kw = {"size": SIZE, "n_boot": 200, "class_names": ["A"], "seed": 3}
  res = localization.score_all(cases, maps, SPACE, **kw)
  for p in ("dice", "hit_rate_expected", "energy", "auprc", "miou_otsu_float"):
    e = res[p]["A"]
    assert e["lo"] <= e["value"] <= e["hi"] and e["lo"] < e["hi"], p
  assert localization.score_all(cases, maps, SPACE, **kw) == res  # seeded
  # One patient holding every image: every resample is the whole set, the interval a point.
  one = [localization.Case(c.row, c.cls, c.boxes, "only", c.prob) for c in cases]
  e = localization.score_all(one, maps, SPACE, **kw)["dice"]["A"]
  assert e["lo"] == pytest.approx(e["value"]) and e["hi"] == pytest.approx(e["value"])


def test_result_is_strict_json_and_complete():
  cases, maps = graded_cases(12, 6)
  res = localization.score_all(
    cases,
    {c.row: maps[(c.row, 0)][..., None] for c in cases},
    SPACE,
    size=SIZE,
    n_boot=10,
    class_names=["A"],
  )
  json.dumps(res, allow_nan=False)
  protocols = {"dice", "miou_otsu_float", "miou_tuned", "hit_rate_expected", "energy", "auprc"}
  protocols |= {"chexlocalize_miou_otsu", "chexlocalize_miou_tuned", "chexlocalize_hit_rate"}
  protocols |= {
    f"{w}_{k}@{t:g}"
    for w in ("acc", "afp")
    for k in localization.KINDS
    for t in localization.DEFAULT_TS
  }
  assert set(res) == protocols | {"settings"}
  assert res["settings"]["n_cases"] == {"A": 12}


def test_maps_outside_unit_interval_are_refused():
  with pytest.raises(ValueError, match="outside"):
    score(2 * grid_mask((2, 5), (5, 9)), [BOX])


def test_table4_bold_best_and_afp_lower_is_better():
  good = score(grid_mask((2, 5), (5, 9)), [BOX])
  shifted = score(grid_mask((2, 5), (6, 10)), [BOX])
  protocols = ("dice", "afp_iobb@0.9")
  t = paper_tables.table4_rows({"model": good, "shifted": shifted}, protocols=protocols)
  rows = {(r["class"], r["source"]): r for r in t["rows"]}
  assert rows[("A", "model")]["dice"]["best"] and not rows[("A", "shifted")]["dice"]["best"]
  assert rows[("A", "model")]["afp_iobb@0.9"]["best"]  # 0 false positives beats 1
  assert rows[("mean", "shifted")]["dice"]["value"] == pytest.approx(0.75)
  lines = t["markdown"].splitlines()
  assert lines[0] == "| Class | Source | dice | afp_iobb@0.9 |"
  assert lines[2].startswith("| A | model | **1.000** (1.000-1.000)")
  assert t["csv"].splitlines()[0].startswith("class,source,dice_value,dice_lo")


def test_table4_bolds_the_best_when_a_source_lacks_the_protocol():
  good = score(grid_mask((2, 5), (5, 9)), [BOX])
  shifted = score(grid_mask((2, 5), (6, 10)), [BOX])
  lacking = {"dice": shifted["dice"]}  # like the constant map, which has no mIoU
  t = paper_tables.table4_rows({"model": good, "shifted": shifted, "constant": lacking},
                      protocols=("dice", "miou_otsu_float"))  # fmt: skip
  rows = {(r["class"], r["source"]): r for r in t["rows"]}
  for cls in ("A", "mean"):
    assert rows[(cls, "model")]["miou_otsu_float"]["best"], cls
    assert not rows[(cls, "shifted")]["miou_otsu_float"]["best"]
    assert not rows[(cls, "constant")]["miou_otsu_float"]["best"]


def test_boxes_from_map_returns_a_planted_lesion_in_image_pixels():
  # A non-square image (H 300, W 500) with a lesion at x 310..370, y 60..110; the map covers
  # the image stretched to a square, as the model input does.
  h, w, n = 300, 500, 128
  img = np.zeros((h, w))
  img[60:110, 310:370] = 1.0
  ys, xs = (np.arange(n) + 0.5) * h / n, (np.arange(n) + 0.5) * w / n
  s = ((ys[:, None] >= 60) & (ys[:, None] < 110) & (xs[None] >= 310) & (xs[None] < 370)) * 0.9
  s = s + 0.05 + 0.05 * np.random.default_rng(7).random((n, n))
  boxes = localization.boxes_from_map(s, 0.5, (h, w))
  assert len(boxes) == 1
  b = boxes[0]
  cell_x, cell_y = w / n, h / n  # 3.9 and 2.3 image pixels
  assert abs(b["x"] - 310) <= cell_x and abs(b["x"] + b["w"] - 370) <= cell_x
  assert abs(b["y"] - 60) <= cell_y and abs(b["y"] + b["h"] - 110) <= cell_y
  assert 0.95 <= b["peak"] <= 1.0 and 0.9 < b["mean"] <= b["peak"]
  # Two blobs: sorted by peak, each box from the same components as the IoBB protocol.
  s2 = s.copy()
  s2[100:110, 10:20] = 0.7
  two = localization.boxes_from_map(s2, 0.5, (h, w))
  assert [round(x["peak"], 1) for x in two] == [1.0, 0.7]
  assert len(two) == len(overlap.predicted_boxes(s2, 0.5, localization.EVAL_SIZE))
  assert two[1]["x"] == pytest.approx(10 * w / n) and two[1]["y"] == pytest.approx(100 * h / n)
  assert localization.boxes_from_map(np.zeros((n, n)), 0.5, (h, w)) == []
