"""Tests of the grain input pipelines (lsemil.data.pipeline; paper Sec 4.2)."""

from __future__ import annotations

import cv2
import ml_collections
import numpy as np
import pytest

from lsemil.core import configuration
from lsemil.data import nih, pipeline, preparation


def make_config(**data) -> ml_collections.ConfigDict:
  """The paper config's data section (configs/paper.py states every default), 64 px, batch 4."""
  c = configuration.load_config("paper")
  c.model.input_size = 64
  c.train.batch_size, c.train.eval_batch_size = 4, 6
  c.data.update(data)
  return c


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, write_nih_folder):
  """(raw 1024 folder, prepared png folder, prepared tfds folder) of 10 patients."""
  base = tmp_path_factory.mktemp("pipe")
  write_nih_folder(base / "raw", patients=10, per_patient=2)
  preparation.prepare(base / "raw", base / "png", workers=2, progress=False)
  preparation.prepare(base / "raw", base / "tf", fmt="tfds", workers=2, progress=False)
  return base / "raw", base / "png", base / "tf"


@pytest.fixture(scope="module")
def same_dir(tmp_path_factory, write_nih_folder):
  """A prepared folder whose images are all the same: only augmentation changes pixels."""
  base = tmp_path_factory.mktemp("same")
  write_nih_folder(base / "raw", patients=6, per_patient=1, size=512, same=True)
  preparation.prepare(base / "raw", base / "png", workers=0, progress=False)
  return base / "png"


def _take(it, n):
  return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- warp


def test_identity_warp_is_exact_and_shift_moves_pixels():
  img = np.zeros((64, 64), np.uint8)
  img[10, 20] = 200
  np.testing.assert_array_equal(pipeline.warp(img, 64), img)
  # Shift is in output pixels: +3 in x, -2 in y.
  moved = pipeline.warp(img, 64, shift=(3.0, -2.0))
  assert moved[8, 23] == 200 and moved.sum() == 200
  # 90 degrees counter-clockwise about the centre (31.5, 31.5): (x, y) -> (y, 63 - x).
  rot = pipeline.warp(img, 64, angle_deg=90.0)
  assert rot[63 - 20, 10] == 200


def test_large_downscale_is_antialiased():
  # A 1-pixel checkerboard has mean grey 127.5; an aliased 4x shrink would keep one phase.
  board = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)
  small = pipeline.warp(board, 128)
  assert abs(float(small.mean()) - 127.5) < 1 and small.std() < 1


def test_prepared_image_matches_prepare(dirs):
  """A raw 1024 px image brought to 512 as the pipeline does equals `prepare`'s file."""
  raw, png, _ = dirs
  image_id = sorted((png / "images").iterdir())[0].name
  np.testing.assert_array_equal(
    pipeline.prepared_image(cv2.imread(str(raw / "images" / image_id), cv2.IMREAD_GRAYSCALE)),
    cv2.imread(str(png / "images" / image_id), cv2.IMREAD_GRAYSCALE),
  )


# --------------------------------------------------------------------------- sources


def test_sources_agree_across_formats(dirs):
  raw, png, tf = dirs
  for split in ("train", "valid", "test"):
    a, b, c = (pipeline.open_source(d, split) for d in (raw, png, tf))
    assert len(a) == len(b) == len(c) > 0
    for i in range(len(a)):
      ra, rb, rc = a[i], b[i], c[i]
      assert ra["row"] == rb["row"] == rc["row"]
      assert rb["image"].dtype == np.uint8 and rb["image"].shape == (512, 512)
      np.testing.assert_array_equal(ra["image"], rb["image"])
      np.testing.assert_array_equal(rb["image"], rc["image"])
      np.testing.assert_array_equal(rb["labels"], rc["labels"])
      assert rb["labels"].dtype == np.float32 and rb["labels"].shape == (14,)


def test_tfds_source_with_other_split_seed_maps_rows(dirs):
  _, png, tf = dirs
  a = pipeline.open_source(png, "valid", split_seed=3)
  b = pipeline.open_source(tf, "valid", split_seed=3)
  assert [a[i]["row"] for i in range(len(a))] == [b[i]["row"] for i in range(len(b))]
  np.testing.assert_array_equal(a[0]["image"], b[0]["image"])


# --------------------------------------------------------------------------- train


def test_train_batches_shape_range_and_formats_equal(dirs):
  _, png, tf = dirs
  config = make_config()
  a = _take(pipeline.make_train_iter(config, png), 3)
  b = _take(pipeline.make_train_iter(config, tf), 3)
  for x, y in zip(a, b, strict=True):
    assert x["image"].shape == (4, 64, 64, 1) and x["image"].dtype == np.uint8
    assert x["labels"].shape == (4, 14) and x["labels"].dtype == np.float32
    assert x["image"].max() > 50  # not blank
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["labels"], y["labels"])


def test_augmentation_deterministic_by_seed(dirs):
  _, png, _ = dirs
  a = _take(pipeline.make_train_iter(make_config(), png), 2)
  b = _take(pipeline.make_train_iter(make_config(), png), 2)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  c = make_config()
  c.seed = 1
  other = next(pipeline.make_train_iter(c, png))
  assert not np.array_equal(a[0]["image"], other["image"])


def test_augmentation_differs_across_epochs(same_dir):
  c = make_config()
  n = pipeline.num_examples(same_dir, "train", c)
  c.train.batch_size = n  # one batch = one epoch
  e0, e1 = _take(pipeline.make_train_iter(c, same_dir), 2)
  assert not np.array_equal(e0["image"], e1["image"])
  c.data.augment = False
  f0, f1 = _take(pipeline.make_train_iter(c, same_dir), 2)
  np.testing.assert_array_equal(f0["image"], f1["image"])  # control: identical images
  # Within an epoch every image gets its own warp.
  assert len({e0["image"][i].tobytes() for i in range(n)}) == n


def test_train_epoch_is_a_permutation(dirs):
  _, png, _ = dirs
  c = make_config(augment=False)
  n = pipeline.num_examples(png, "train", c)
  c.train.batch_size = n
  e0, e1 = _take(pipeline.make_train_iter(c, png), 2)
  key = lambda b: sorted(b["image"][i].tobytes() for i in range(n))  # noqa: E731
  assert key(e0) == key(e1)  # same examples...
  assert not np.array_equal(e0["image"], e1["image"])  # ...in another order


def test_iterator_state_restores_identical_next_batch(dirs):
  _, png, _ = dirs
  config = make_config()
  it = pipeline.make_train_iter(config, png)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  resumed = pipeline.make_train_iter(config, png)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 2), strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["labels"], y["labels"])


def test_two_processes_split_the_global_batch(dirs):
  _, png, _ = dirs
  c = make_config(augment=False)
  c.train.batch_size = 4
  whole = next(pipeline.make_train_iter(c, png))
  parts = [next(pipeline.make_train_iter(c, png, process_index=p, process_count=2)) for p in (0, 1)]
  assert parts[0]["image"].shape[0] == 2
  # Process p holds elements p, p+2 of the global stream.
  np.testing.assert_array_equal(parts[0]["image"], whole["image"][0::2])
  np.testing.assert_array_equal(parts[1]["image"], whole["image"][1::2])
  c.train.batch_size = 5
  with pytest.raises(ValueError, match="multiple of process_count=2"):
    pipeline.make_train_iter(c, png, process_count=2)


def test_worker_process_pipeline_matches_in_process(dirs):
  _, png, _ = dirs
  c = make_config(worker_count=1)
  it = pipeline.make_train_iter(c, png)
  try:
    got = _take(it, 2)
  finally:
    it.close()
  want = _take(pipeline.make_train_iter(make_config(), png), 2)
  for x, y in zip(got, want, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_steps_per_epoch(dirs):
  _, png, _ = dirs
  c = make_config()
  assert pipeline.steps_per_epoch(png, c) == pipeline.num_examples(png, "train", c) // 4


# --------------------------------------------------------------------------- eval


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_covers_each_example_exactly_once(dirs, split, process_count):
  _, png, _ = dirs
  c = make_config()
  n = pipeline.num_examples(png, split, c)
  assert n % c.train.eval_batch_size, "want a padded last batch"
  per_process = [
    list(pipeline.make_eval_iter(c, png, split, process_index=p, process_count=process_count))
    for p in range(process_count)
  ]
  assert len({len(b) for b in per_process}) == 1  # same number of batches everywhere
  rows = []
  for batches in per_process:
    for b in batches:
      local = 6 // process_count
      assert b["image"].shape == (local, 64, 64, 1) and b["mask"].dtype == bool
      assert b["row"].dtype == np.int32
      assert np.all(b["row"][~b["mask"]] == -1) and np.all(b["image"][~b["mask"]] == 0)
      rows += b["row"][b["mask"]].tolist()
  expected = [pipeline.open_source(png, split)[i]["row"] for i in range(n)]
  assert sorted(rows) == sorted(expected) and len(rows) == len(set(rows)) == n
  if process_count == 1:
    assert rows == expected  # fixed (index) order


def test_eval_images_are_unaugmented_resizes(dirs):
  _, png, _ = dirs
  c = make_config()
  first = next(iter(pipeline.make_eval_iter(c, png, "test")))
  src = pipeline.open_source(png, "test")[0]["image"]
  expected = cv2.resize(src, (64, 64), interpolation=cv2.INTER_AREA)
  assert first["image"].dtype == np.uint8
  np.testing.assert_array_equal(first["image"][0, :, :, 0], expected)


@pytest.mark.parametrize("url", ["gs://bucket/x", "s3://bucket/x/", "https://host/data"])
def test_remote_data_dir_is_refused_clearly(url):
  msg = (
    f"data folders must be on local disk: {url} is remote; copy it to each host first, "
    "e.g. tpu_scripts/stage_data.sh with STAGE_TO=workers"
  )
  for open_remote in (
    lambda: pipeline.open_source(url, "train"),
    lambda: pipeline.ImageSource(url, "train"),
    lambda: nih.open_index(url, val_fraction=0.25, split_seed=0),
    lambda: pipeline.make_train_iter(make_config(), url),
  ):
    with pytest.raises(nih.DataError) as e:
      open_remote()
    assert str(e.value) == msg
    assert isinstance(e.value, ValueError)
