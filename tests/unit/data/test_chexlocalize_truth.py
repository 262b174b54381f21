"""The CheXlocalize reader (lsemil.data.chexlocalize_truth) on a ground-truth JSON in the release's
format (pycocotools-encoded masks, every pathology per CXR), and its COCO RLE decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_api

from lsemil.core.errors import DataError
from lsemil.data import chexlocalize_truth, sources

BAD_RLE = {"size": [4, 4], "counts": [3]}


def rle(mask):
  r = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": r["size"], "counts": r["counts"].decode()}


def cxr(hw, positive):
  out = {}
  for k, c in enumerate(chexlocalize_truth.CLASSES):
    m = np.zeros(hw, bool)
    if c in positive:
      m[k : k + 3, 2 : 2 + k] = True
      m[-1, -1] = True
    out[c] = rle(m)
  return out


def write(tmp_path, val, test):
  folder = tmp_path / "CheXlocalize"
  folder.mkdir()
  (folder / "gt_segmentations_val.json").write_text(json.dumps(val))
  (folder / "gt_segmentations_test.json").write_text(json.dumps(test))
  return tmp_path


def test_masks_labels_split(tmp_path):
  val = {"patient64541_study1_view1_frontal": cxr((12, 17), {"Edema", "Cardiomegaly"})}
  test = {"patient64741_study2_view2_lateral": cxr((15, 11), {"Support Devices"})}
  with pytest.warns(UserWarning, match="2 of 2 images have no file"):
    idx = sources.load("chexlocalize", write(tmp_path, val, test))
  assert idx.splits.tolist() == ["valid", "test"] and idx.patient_ids.tolist() == [
    "patient64541", "patient64741"]  # fmt: skip
  assert idx.image_paths[1].endswith("CheXpert/test/patient64741/study2/view2_lateral.jpg")
  edema = chexlocalize_truth.CLASSES.index("Edema")
  assert idx.labels[0].sum() == 2 and idx.labels[0, edema] == 1
  want = np.zeros((12, 17), bool)
  want[edema : edema + 3, 2 : 2 + edema] = want[-1, -1] = True
  np.testing.assert_array_equal(chexlocalize_truth.mask(idx, 0, edema), want)
  assert chexlocalize_truth.mask(idx, 0, 0) is None


@pytest.mark.parametrize(
  ("val", "match"),
  [
    ({"p1_study1_view1_frontal": cxr((4, 4), set())}, r"val\.json: p1_study1.*not an id"),
    ({"patient1_study1_view1_frontal": {"Edema": rle(np.ones((2, 2)))}}, r"missing \["),
    (
      {
        "patient1_study1_view1_frontal": {
          **cxr((4, 4), set()),
          "Edema": {"size": [4, 4], "counts": [3]},
        }
      },
      r"patient1_study1_view1_frontal, Edema: its runs cover 3 pixels, not 4x4",
    ),
  ],
)
def test_bad_cxr_names_file_and_id(tmp_path, val, match):
  with pytest.raises(DataError, match=match):
    sources.load("chexlocalize", write(tmp_path, val, {}))


def test_rle_masks_decode_as_pycocotools():
  rng = np.random.default_rng(4)
  shapes = [(7, 11), (30, 45), (1, 5)]
  for i, hw in enumerate(shapes * 4):
    m = np.zeros(hw, np.uint8)
    if i % 4:
      m = (rng.random(hw) < rng.choice([0.05, 0.5, 0.97])).astype(np.uint8)
    rle = mask_api.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()  # as cheXlocalize's JSON stores it
    got = chexlocalize_truth.rle_mask(rle)
    np.testing.assert_array_equal(got, mask_api.decode(rle).astype(bool))
    np.testing.assert_array_equal(got, m.astype(bool))
  # uncompressed counts: 2 zeros, 3 ones, 1 zero, column-major in a 3 x 2 image
  np.testing.assert_array_equal(
    chexlocalize_truth.rle_mask({"size": [3, 2], "counts": [2, 3, 1]}), [[0, 1], [0, 1], [1, 0]]
  )
  with pytest.raises(DataError, match="cover 5 pixels, not 3x2"):
    chexlocalize_truth.rle_mask({"size": [3, 2], "counts": [2, 3]})
