"""lsemil.metrics.detection: AP against pycocotools' COCOeval, loc-acc on a hand case, RoDeO
against the authors' package (rodeometric, with its upstream fix), the bootstrap shortcuts
against recomputing on a resampled set."""

from __future__ import annotations

import contextlib
import io
import random

import numpy as np
import pytest
import sklearn.metrics
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lsemil.metrics import detection


def random_set(seed, n=30, n_classes=3):
  """Per image predictions (x, y, w, h, class, score) and truth (x, y, w, h, class): boxes
  near each other so that IoUs spread over [0, 1]; some images without truth or predictions."""
  rng = np.random.default_rng(seed)
  preds, truth = [], []
  for _ in range(n):
    t = []
    for _ in range(rng.integers(0, 4)):
      x, y = rng.uniform(0, 60, 2)
      t.append([x, y, *rng.uniform(5, 30, 2), rng.integers(n_classes)])
    p = []
    for _ in range(rng.integers(0, 5)):
      if t and rng.random() < 0.7:
        b = np.array(t[rng.integers(len(t))], float)
        xywh = b[:4] + rng.normal(0, 4, 4) * [1, 1, 0.5, 0.5]
        xywh[2:] = np.maximum(xywh[2:], 1)
        cls = b[4] if rng.random() < 0.8 else rng.integers(n_classes)
      else:
        xywh, cls = [*rng.uniform(0, 60, 2), *rng.uniform(5, 30, 2)], rng.integers(n_classes)
      p.append([*xywh, cls, rng.random()])
    preds.append(np.array(p, float).reshape(-1, 6))
    truth.append(np.array(t, float).reshape(-1, 5))
  return preds, truth


def cocoeval_ap(preds, truth, n_classes, thr):
  """Per class and mean AP of pycocotools' COCOeval with iouThrs = [thr]."""
  images = [{"id": i + 1, "width": 100, "height": 100} for i in range(len(truth))]
  anns = [
    {"id": len(images) + j, "image_id": i + 1, "category_id": int(b[4]) + 1,
     "bbox": [float(v) for v in b[:4]], "area": float(b[2] * b[3]), "iscrowd": 0}
    for i, t in enumerate(truth) for j, b in enumerate(t, start=100 * i)
  ]  # fmt: skip
  gt = COCO()
  gt.dataset = {
    "images": images,
    "annotations": anns,
    "categories": [{"id": k + 1, "name": str(k)} for k in range(n_classes)],
  }
  dets = [
    {"image_id": i + 1, "category_id": int(b[4]) + 1, "bbox": [float(v) for v in b[:4]],
     "score": float(b[5])}
    for i, p in enumerate(preds) for b in p
  ]  # fmt: skip
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.params.iouThrs = np.array([thr])
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  prec = ev.eval["precision"][0, :, :, 0, -1]  # (recall points, classes) at area all, 100 dets
  per_class = np.array([prec[:, k].mean() if (prec[:, k] > -1).any() else np.nan
                        for k in range(n_classes)])  # fmt: skip
  return per_class, ev.stats[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thr", [0.3, 0.5])
def test_ap_equals_cocoeval(seed, thr):
  preds, truth = random_set(seed)
  want, want_mean = cocoeval_ap(preds, truth, 3, thr)
  got = detection.coco_ap(preds, truth, 3, thr)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
  assert np.nanmean(got) == pytest.approx(want_mean, abs=1e-12)


def test_ap_bootstrap_weights_equal_the_resampled_set():
  preds, truth = random_set(5)
  rng = np.random.default_rng(0)
  draws = [rng.integers(0, len(preds), len(preds)) for _ in range(3)]
  counts = np.stack([np.bincount(d, minlength=len(preds)) for d in draws])
  got = detection.coco_ap(preds, truth, 3, 0.5, counts)
  for r, d in enumerate(draws):
    want = detection.coco_ap([preds[i] for i in d], [truth[i] for i in d], 3, 0.5)
    np.testing.assert_allclose(got[r], want, atol=1e-12)


def test_loc_acc_hand_case():
  # class 0: image 0 has one truth box and two predictions, one of IoU 0.4 with it; image 1
  # has nothing of class 0 (a true negative); image 2 a prediction without truth.
  # class 1: image 0 a missed truth box; image 1 a truth box hit with IoU 1.
  truth = [
    np.array([[0, 0, 10, 10, 0], [50, 50, 10, 10, 1]], float),
    np.array([[20, 20, 5, 5, 1]], float),
    np.zeros((0, 5)),
  ]
  preds = [
    np.array([[0, 0, 10, 4, 0, 0.9], [80, 80, 5, 5, 0, 0.1]], float),  # IoU 40 / 100
    np.array([[20, 20, 5, 5, 1, 0.5]], float),
    np.array([[1, 1, 3, 3, 0, 0.2]], float),
  ]
  counts = detection.loc_acc_counts(preds, truth, 2, [0.3, 0.5])
  acc = detection.loc_acc(*counts)
  # class 0 at 0.3: TP 1, TN 1 (image 1), FP 3 - 1, FN 1 - 1 -> 2 / 4;
  #   at 0.5: TP 0, TN 1, FP 3, FN 1 -> 1 / 5
  # class 1 at both: TP 1, TN 1 (image 2), FP 1 - 1, FN 2 - 1 -> 2 / 3
  np.testing.assert_allclose(acc, [[2 / 4, 1 / 5], [2 / 3, 2 / 3]])


def package_rodeo(preds, truth, n_classes):
  """The authors' RoDeO with their upstream fix (FeliMe/RoDeO cc55193: the clamp of a float).
  rodeometric (the test extra) is imported here, so that only the RoDeO tests need it."""
  from rodeo import rodeo as rodeo_module  # noqa: PLC0415

  mp = pytest.MonkeyPatch()
  mp.setattr(rodeo_module, "matthews_corrcoef",
             lambda a, b: np.float64(sklearn.metrics.matthews_corrcoef(a, b)))  # fmt: skip
  try:
    metric = rodeo_module.RoDeO([str(k) for k in range(n_classes)], return_per_class=True)
    metric.add([p[:, :5] for p in preds], truth)
    with np.errstate(all="ignore"):
      return metric.compute()
  finally:
    mp.undo()


def readme_example():
  """The usage example of the authors' README (FeliMe/RoDeO), two classes."""
  pred = np.array([[0.1, 0.1, 0.2, 0.1, 0.0], [0.0, 0.3, 0.1, 0.1, 1.0], [0.2, 0.2, 0.1, 0.1, 0.0]])
  target = np.array([[0.0, 0.0, 0.1, 0.1, 0.0], [0.0, 0.2, 0.1, 0.1, 1.0]])
  return [np.column_stack([pred, np.ones(3)])], [target]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", ["readme", 0, 1, 2])
def test_rodeo_equals_the_authors_package(case):
  preds, truth = readme_example() if case == "readme" else random_set(case, n_classes=3)
  n_classes = 2 if case == "readme" else 3
  want = package_rodeo(preds, truth, n_classes)
  got = detection.rodeo(preds, truth, n_classes)
  names = {"total": "total", "localization": "localization", "shape": "shape_matching",
           "classification": "classification"}  # fmt: skip
  for ours, theirs in names.items():
    assert got[ours] == pytest.approx(want[f"RoDeO/{theirs}"], abs=1e-12), ours
    for k in range(n_classes):
      v = want[f"RoDeO/{k}/{theirs}"]
      assert got["by_class_" + ours][k] == pytest.approx(v, abs=1e-12, nan_ok=True), (ours, k)


@pytest.mark.filterwarnings("ignore")
def test_rodeo_bootstrap_recomputes_the_matching_weight():
  preds, truth = random_set(7, n_classes=3)
  rng = np.random.default_rng(1)
  draws = [rng.integers(0, len(preds), len(preds)) for _ in range(3)]
  counts = np.stack([np.bincount(d, minlength=len(preds)) for d in draws])
  got = detection.rodeo(preds, truth, 3, counts)
  for r, d in enumerate(draws):
    want = package_rodeo([preds[i] for i in d], [truth[i] for i in d], 3)
    assert got["total"][r] == pytest.approx(want["RoDeO/total"], abs=1e-12)
    assert got["classification"][r] == pytest.approx(want["RoDeO/classification"], abs=1e-12)


def test_wsrpn_split_is_patient_wise_and_halves_the_boxes():
  # one id per box, as BBox_List_2017.csv lists them; patient = the name before '_'
  boxes = ["a_0", "a_0", "b_0", "c_0", "c_1", "d_0", "e_0", "e_0", "f_0", "g_0"]
  valid, test = detection.wsrpn_split(boxes, lambda im: im.split("_")[0])
  shuffled = list(boxes)
  random.Random(0).shuffle(shuffled)
  patients = list(dict.fromkeys(im.split("_")[0] for im in shuffled))
  want, n = set(), 0
  for p in patients:  # whole patients while validation holds fewer than 10 // 2 boxes
    if n < 5:
      want |= {im for im in boxes if im.startswith(p)}
      n += sum(im.startswith(p) for im in boxes)
  assert valid == want and test == set(boxes) - want
  assert not {im.split("_")[0] for im in valid} & {im.split("_")[0] for im in test}
