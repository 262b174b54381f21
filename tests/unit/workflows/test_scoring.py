"""lsemil.workflows.scoring: the boxes' pixels on a non-square image, the inputs' errors, and the
all-images protocols (true_pos_only=False, the probability cutoff) on a small map set."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_api

from lsemil.core import fileio
from lsemil.core.errors import DataError
from lsemil.data import chexlocalize_truth
from lsemil.metrics import chexlocalize, localization
from lsemil.workflows import scoring


def map_set(n=40, seed=0, probs=True) -> scoring.MapSet:
  rng = np.random.default_rng(seed)
  maps = rng.random((n, 1, 6, 9)).astype(np.float32)
  p = rng.random((n, 1)) if probs else None
  ids = tuple(f"img{i:03d}" for i in range(n))
  return scoring.MapSet(ids, ("Mass",), maps, p, np.tile([30, 45], (n, 1)), ids)


def test_boxes_mask_pixel_centres_non_square():
  # columns with 1.2 <= j + 0.5 < 3.2: 1, 2; rows with 0.4 <= i + 0.5 < 3.5: 0, 1, 2
  m = scoring.boxes_mask([(1.2, 0.4, 2.0, 3.1)], (5, 8))
  want = np.zeros((5, 8), bool)
  want[0:3, 1:3] = True
  np.testing.assert_array_equal(m, want)
  assert scoring.boxes_mask([], (3, 4)).shape == (3, 4)


@pytest.mark.parametrize(
  "text, match",
  [
    ("image,class,x,y,w,h\n", "header"),
    ("image_id,class,x,y,w,h\nimg000,Mass,1,2,3\n", "line 2"),
    ("image_id,class,x,y,w,h\nimg000,Mass,1,2,3,4\nnope,Mass,1,2,3,4\n", "line 3: image 'nope'"),
    ("image_id,class,x,y,w,h\nimg001,Mass,40,2,6,4\n", "line 2: the box leaves the 45x30"),
    ("image_id,class,x,y,w,h\nimg001,Mass,4,2,0,4\n", "line 2: a box needs"),
  ],
)
def test_box_csv_errors_name_the_line(tmp_path, text, match):
  path = tmp_path / "boxes.csv"
  path.write_text(text)
  with pytest.raises(DataError, match=match):
    scoring.read_boxes(path, map_set(3))


def test_all_images_protocols_and_cutoff():
  ms = map_set()
  rng = np.random.default_rng(1)
  boxes = {(im, "Mass"): [(10.0, 5.0, 20.0, 12.0)] for im in ms.image_ids if rng.random() < 0.5}
  res = scoring.score(ms, boxes, n_boot=0)
  tune = np.array([localization.tuning_half(im) for im in ms.image_ids])
  iou_all, gt_any = [], []
  for i, im in enumerate(ms.image_ids):
    g = scoring.boxes_mask(boxes.get((im, "Mass"), ()), (30, 45))
    pred = chexlocalize.otsu_segmentation(chexlocalize.resize(ms.maps[i, 0], (30, 45)))
    iou_all.append(chexlocalize.iou(pred, g, true_pos_only=False))
    gt_any.append(g.any())
  iou_all, gt_any = np.array(iou_all), np.array(gt_any)
  e = res["chexlocalize_miou_otsu_all"]["Mass"]
  assert e["point"] == pytest.approx(np.nanmean(iou_all), abs=1e-12) and e["n"] == 40
  # the cutoff: tuned on the tuning half with prob > c, mIoU rounded to 3 decimals
  p = ms.probs[:, 0]
  mious = []
  for c in np.arange(0, 0.9, 0.1):
    v = np.where(p[tune] > c, iou_all[tune], np.where(gt_any[tune], 0.0, np.nan))
    mious.append(round(float(np.nanmean(v)), 3))
  best = round(float(np.arange(0, 0.9, 0.1)[int(np.nanargmax(mious))]), 1)
  cut = res["chexlocalize_miou_otsu_cutoff"]["Mass"]
  assert cut["cutoff"] == best
  r = ~tune
  v = np.where(p[r] >= best, iou_all[r], np.where(gt_any[r], 0.0, np.nan))
  assert cut["point"] == pytest.approx(np.nanmean(v), abs=1e-12)
  # images without a box are NaN in the true-positive-only protocols
  assert res["chexlocalize_hit_rate"]["Mass"]["n_pairs"] == int(gt_any.sum())
  assert res["chexlocalize_miou_otsu"]["Mass"]["n_pairs"] <= int(gt_any.sum())


def test_without_probabilities_no_cutoff_and_non_finite_map_names_the_image():
  ms = map_set(6, probs=False)
  res = scoring.score(ms, {("img001", "Mass"): [(1.0, 1.0, 9.0, 9.0)]}, n_boot=0)
  assert "chexlocalize_miou_otsu_cutoff" not in res and not math.isnan(
    res["chexlocalize_miou_otsu_all"]["Mass"]["point"]
  )
  ms.maps[4, 0, 2, 2] = np.inf
  with pytest.raises(DataError, match="image img004, class Mass"):
    scoring.score(ms, {("img001", "Mass"): [(1.0, 1.0, 9.0, 9.0)]}, n_boot=0)


def test_score_and_evaluates_score_all_give_identical_protocols():
  # The same maps of box images, as `lsemil evaluate` keeps them (score_all: box cases only)
  # and as an npz for `lsemil score` (every image x box class).
  rng = np.random.default_rng(5)
  n, space, classes = 30, 40, ("Mass", "Nodule", "Edema")
  ids = tuple(f"{(7 * i) % n:05d}_000.png" for i in range(n))  # not in row order
  patients = [i // 2 for i in range(n)]
  maps = rng.random((n, 8, 8, 3)) ** 2
  cases, boxes = [], {}
  for i in range(n):
    for k in sorted(rng.choice(3, size=rng.integers(1, 3), replace=False)):
      b = (float(rng.integers(0, 20)), float(rng.integers(0, 20)), 15.0, 12.0)
      cases.append(localization.Case(i, int(k), (b,), patients[i]))
      boxes[(ids[i], classes[k])] = [b]
  kw = {"n_boot": 60, "seed": 2}
  evaluated = localization.score_all(
    cases, dict(enumerate(maps)), space, class_names=classes, image_ids=ids, **kw
  )
  ms = scoring.MapSet(
    ids,
    classes,
    maps.transpose(0, 3, 1, 2),
    None,
    np.full((n, 2), space),
    tuple(map(str, patients)),
  )
  scored = fileio.json_safe(scoring.score(ms, boxes, **kw))
  for p in ("chexlocalize_miou_otsu", "chexlocalize_miou_tuned", "chexlocalize_hit_rate"):
    assert scored[p] == evaluated[p], p


def test_masks_score_as_the_boxes_they_draw(tmp_path):
  ms = map_set(20, seed=3)
  boxes = {(im, "Mass"): [(4.0, 3.0, 21.0, 13.0)] for im in ms.image_ids[::3]}
  gt = {}
  for im in ms.image_ids:
    m = scoring.boxes_mask(boxes.get((im, "Mass"), ()), (30, 45)).astype(np.uint8)
    rle = mask_api.encode(np.asfortranarray(m))
    gt[im] = {"Mass": {"size": rle["size"], "counts": rle["counts"].decode()}}
  (tmp_path / "gt.json").write_text(json.dumps(gt))
  masks = scoring.read_masks(tmp_path / "gt.json", ms)
  by_masks = fileio.json_safe(scoring.score(ms, None, 30, 1, masks=masks))
  assert by_masks == fileio.json_safe(scoring.score(ms, boxes, 30, 1))
  assert by_masks["chexlocalize_miou_otsu"]["Mass"]["n"] == 7


def test_a_folder_of_per_image_npz_reads_as_one(tmp_path):
  ms = map_set(9, seed=6)
  one = tmp_path / "one.npz"
  fields = {"classes": np.array(ms.classes), "image_sizes": ms.image_sizes}
  np.savez(one, image_ids=np.array(ms.image_ids), maps=ms.maps, probs=ms.probs, **fields)
  folder = tmp_path / "per_image"
  folder.mkdir()
  for i, im in enumerate(ms.image_ids):
    per = {k: v[i : i + 1] for k, v in fields.items() if k != "classes"}
    np.savez(folder / f"{im}.npz", image_ids=np.array([im]), classes=fields["classes"],
             maps=ms.maps[i : i + 1], probs=ms.probs[i : i + 1], **per)  # fmt: skip
  boxes = {(im, "Mass"): [(3.0, 2.0, 20.0, 11.0)] for im in ms.image_ids[::2]}
  got = [fileio.json_safe(scoring.score(scoring.read_maps(p), boxes, 20)) for p in (one, folder)]
  assert got[0] == got[1]
  np.savez(folder / "zz.npz", image_ids=np.array(["x"]), classes=np.array(["Edema"]),
           maps=np.zeros((1, 1, 2, 2)))  # fmt: skip
  with pytest.raises(DataError, match="zz.npz: classes"):
    scoring.read_maps(folder)


def test_truth_from_a_chestx_det10_folder(tmp_path):
  entries = [
    {"file_name": "1.png", "syms": ["Mass", "Nodule"], "boxes": [[10, 20, 29, 59], [0, 0, 9, 9]]},
    {"file_name": "2.png", "syms": [], "boxes": []},
  ]
  (tmp_path / "train.json").write_text(json.dumps(entries[:1]))
  (tmp_path / "test.json").write_text(json.dumps(entries[1:]))
  (tmp_path / "lsemil_dataset.json").write_text(json.dumps({"image_size": 64}))
  maps = np.zeros((2, 2, 8, 8))
  maps[0, 0, 2:8, 1:4] = 1.0  # Mass: rows 20..63, cols 8..31 of the 64 px image
  ms = scoring.MapSet(("1.png", "2.png"), ("Mass", "Nodule"), maps, np.full((2, 2), 0.9),
                      np.full((2, 2), 8), ("1.png", "2.png"), sizes_given=False)  # fmt: skip
  with pytest.warns(UserWarning, match="no file"):
    ms, boxes, masks, order = scoring.truth_from_source(ms, "chestx-det10", tmp_path)
  assert masks is None and order == ["1.png", "1.png"]
  assert boxes == {
    ("1.png", "Mass"): [(10.0, 20.0, 20.0, 40.0)],
    ("1.png", "Nodule"): [(0.0, 0.0, 10.0, 10.0)],
  }
  assert ms.image_sizes.tolist() == [[64, 64], [64, 64]]
  res = scoring.score(ms, boxes, 0, protocols=("detection",))
  # Mass: one box (x 8..32, y 16..64) against (10..30, 20..60): IoU 800 / 1152
  assert res["detection_ap@0.5"]["Mass"]["value"] == pytest.approx(1.0, abs=1e-12)
  assert res["detection_ap@0.5"]["Nodule"]["value"] == 0.0  # a constant map: no box


def test_truth_from_a_chexlocalize_folder_equals_its_masks_json(tmp_path):
  ms = map_set(4, seed=8)
  ids = tuple(f"patient{i}_study1_view1_frontal" for i in range(4))
  ms = scoring.MapSet(ids, ("Edema",), ms.maps, ms.probs, ms.image_sizes, ids)
  rng = np.random.default_rng(2)
  gt = {}
  for im in ids:
    gt[im] = {}
    for c in chexlocalize_truth.CLASSES:
      m = (rng.random((30, 45)) < 0.3) if c == "Edema" else np.zeros((30, 45), bool)
      rle = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
      gt[im][c] = {"size": rle["size"], "counts": rle["counts"].decode()}
  (tmp_path / "CheXlocalize").mkdir()
  (tmp_path / "CheXlocalize" / "gt_segmentations_val.json").write_text(json.dumps(gt))
  (tmp_path / "CheXlocalize" / "gt_segmentations_test.json").write_text("{}")
  with pytest.warns(UserWarning, match="no file"):
    got, boxes, masks, _ = scoring.truth_from_source(ms, "chexlocalize", tmp_path)
  assert boxes is None and got.patient_ids == ("patient0", "patient1", "patient2", "patient3")
  (tmp_path / "gt.json").write_text(json.dumps(gt))
  want = scoring.read_masks(tmp_path / "gt.json", ms)
  assert masks.keys() == want.keys() and all((masks[k] == want[k]).all() for k in want)
