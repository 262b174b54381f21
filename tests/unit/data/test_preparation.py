"""Tests of `lsemil prepare` and lsemil.data.imageio (paper Sec 4.2: 1024 -> 512 resize)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lsemil.commands import cli, prepare
from lsemil.core.errors import ImageError, PrepareError
from lsemil.data import imageio, nih, preparation


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, write_nih_folder) -> Path:
  root = tmp_path_factory.mktemp("raw") / "nih"
  write_nih_folder(root)
  return root


@pytest.fixture(scope="module")
def png_dir(raw_dir, tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("prep") / "png"
  preparation.prepare(raw_dir, out, workers=2, progress=False)
  return out


# --------------------------------------------------------------------------- resize / boxes


def test_scale_box_to_output_size():
  assert preparation.scale_box((100, 200, 300, 400), 1024, 512) == (50.0, 100.0, 150.0, 200.0)
  assert preparation.scale_box((10, 20, 30, 40), 512, 128) == (2.5, 5.0, 7.5, 10.0)


def test_prepared_folder_is_nih_layout_with_scaled_boxes(raw_dir, png_dir):
  marker = json.loads((png_dir / "lsemil_dataset.json").read_text())
  assert marker == {"kind": "prepared", "format": "png", "image_size": 512, "box_space": 512,
                    "source": "nih", "classes": list(nih.CLASSES), "prepared_from": "nih"}
  # what a model card reads: the data's origin, through synth -> prepare -> prepare again
  assert preparation.origin(raw_dir) == "nih" and preparation.origin(png_dir) == "nih"
  synth = raw_dir.parent / "synth"
  synth.mkdir()
  (synth / "lsemil_dataset.json").write_text('{"kind": "synthetic"}')
  assert preparation.origin(synth) == "synthetic"
  text = (png_dir / "BBox_List_2017.csv").read_text()
  assert text.splitlines()[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
  rows = list(csv.reader(text.splitlines()))
  assert [float(v) for v in rows[1][2:6]] == [50.0, 100.0, 150.0, 200.0]
  raw, index = nih.load_index(raw_dir), nih.load_index(png_dir)
  assert index.image_ids == raw.image_ids
  np.testing.assert_array_equal(index.labels, raw.labels)
  np.testing.assert_array_equal(index.splits, raw.splits)
  np.testing.assert_allclose(index.box_xywh, raw.box_xywh / 2)
  for row, image_id in enumerate(index.image_ids):
    with Image.open(index.image_paths[row]) as im:
      assert (im.mode, im.size) == ("L", (512, 512)), image_id


@pytest.mark.parametrize("src_side", [1024, 1000, 700])
def test_resize_matches_skimage_within_one_grey_level(src_side, nih_samples_dir, phantom_image):
  from skimage.transform import resize

  real = cv2.imread(str(nih_samples_dir / "00000001_000.png"), cv2.IMREAD_GRAYSCALE)
  assert real is not None, f"missing sample image under {nih_samples_dir}"
  real = cv2.resize(real, (src_side, src_side), interpolation=cv2.INTER_CUBIC)
  for img in (real, phantom_image(3)):
    img = cv2.resize(img, (src_side, src_side), interpolation=cv2.INTER_CUBIC)
    ours = imageio.resize_gray(img, 512).astype(np.float64)
    ref = resize(img, (512, 512), anti_aliasing=True) * 255
    diff = np.abs(ours - ref).max()
    assert diff <= 1.0, diff  # measured: 0.5 (uint8 rounding only)


def test_resize_downscale_by_four_matches_skimage(nih_samples_dir, phantom_image):
  from skimage.transform import resize

  img = cv2.imread(str(nih_samples_dir / "00027426_000.png"), cv2.IMREAD_GRAYSCALE)
  assert img is not None, f"missing sample image under {nih_samples_dir}"
  ref = resize(img, (128, 128), anti_aliasing=True) * 255
  assert np.abs(imageio.resize_gray(img, 128) - ref).max() <= 1.0


# --------------------------------------------------------------------------- PNG modes


def _mode_images(g: np.ndarray) -> dict[str, tuple[Image.Image, np.ndarray]]:
  """PIL image of each mode + its expected 8-bit gray, from the gray phantom `g`."""
  rgb = np.dstack([g, g, g])
  coloured = np.dstack([g, 255 - g, g // 2])
  w16 = g.astype(np.uint16) * 257 + np.uint16(100)
  w16[:4, :4] = 0
  w16[-4:, -4:] = 65535
  luma = (coloured @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)
  return {
    "L": (Image.fromarray(g, "L"), g),
    "LA": (Image.fromarray(np.dstack([g, 255 - g]), "LA"), g),
    "RGB": (Image.fromarray(rgb, "RGB"), g),
    "RGB_colour": (Image.fromarray(coloured, "RGB"), luma),
    "RGBA": (Image.fromarray(np.dstack([rgb, np.full_like(g, 77)]), "RGBA"), g),
    "I;16": (Image.fromarray(w16), np.rint(w16 / 257.0).astype(np.uint8)),
  }


@pytest.fixture(scope="module")
def modes_prepared(tmp_path_factory, write_nih_folder, phantom_image):
  root = tmp_path_factory.mktemp("modes") / "nih"
  ids = write_nih_folder(root, patients=3, per_patient=2)
  images = _mode_images(phantom_image(7))
  mapping = dict(zip(images, ids, strict=False))
  for mode, image_id in mapping.items():
    images[mode][0].save(root / "images" / image_id)
  out = root.parent / "out"
  preparation.prepare(root, out, workers=0, progress=False)
  return out, mapping, images


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGB_colour", "RGBA", "I;16"])
def test_each_png_mode_prepared_pixelwise(modes_prepared, mode):
  out, mapping, images = modes_prepared
  pil, expected_gray = images[mode]
  assert pil.mode == mode.split("_")[0]
  with Image.open(out / "images" / mapping[mode]) as im:
    assert im.mode == "L" and im.size == (512, 512)
    got = np.asarray(im)
  expected = imageio.resize_gray(expected_gray, 512)
  # cv2's fixed-point luma may round one grey level away from the float formula.
  tol = 1 if mode == "RGB_colour" else 0
  assert np.abs(got.astype(int) - expected).max() <= tol


def test_16bit_keeps_full_range_not_clipped():
  w16 = np.array([[0, 257, 32768, 65535]], np.uint16)
  np.testing.assert_array_equal(imageio.to_gray8(w16), [[0, 1, 128, 255]])


# --------------------------------------------------------------------------- bad input


def _break(root: Path, ids: list[str]) -> tuple[Path, Path]:
  truncated = root / "images" / ids[3]
  truncated.write_bytes(truncated.read_bytes()[:5000])
  missing = root / "images" / ids[5]
  missing.unlink()
  return truncated, missing


def test_truncated_png_names_the_file(tmp_path, write_nih_folder):
  ids = write_nih_folder(tmp_path / "nih", patients=3)
  truncated, missing = _break(tmp_path / "nih", ids)
  with pytest.raises(PrepareError, match=str(truncated).replace(".", r"\.")):
    preparation.prepare(tmp_path / "nih", tmp_path / "out", workers=0, progress=False)
  assert not (tmp_path / "out" / "lsemil_dataset.json").exists()


def test_missing_file_names_the_file(tmp_path, write_nih_folder):
  ids = write_nih_folder(tmp_path / "nih", patients=3)
  (tmp_path / "nih" / "images" / ids[4]).unlink()
  with pytest.raises(PrepareError, match=ids[4].replace(".", r"\.") + ".*not found"):
    preparation.prepare(tmp_path / "nih", tmp_path / "out", workers=0, progress=False)


def test_decode_png_rejects_truncated_bytes(phantom_image):
  data = imageio.encode_png(phantom_image(1, 64))
  with pytest.raises(ImageError, match="x.png: truncated"):
    imageio.decode_png(data[:-20], "x.png")


def test_on_bad_skip_lists_and_drops_rows(tmp_path, capsys, write_nih_folder):
  ids = write_nih_folder(tmp_path / "nih", patients=4)
  truncated, missing = _break(tmp_path / "nih", ids)
  out = tmp_path / "out"
  argv = ["--nih-dir", str(tmp_path / "nih"), "--out", str(out), "--on-bad", "skip"]
  rc = cli.main(["prepare", *argv, "--workers", "1"])
  assert rc == 0
  err = capsys.readouterr().err
  assert "2 bad images skipped" in err and str(truncated) in err and ids[5] in err
  bad = (out / "bad_files.txt").read_text().splitlines()
  assert [line.split("\t")[0] for line in bad] == [ids[3], ids[5]]
  index = nih.load_index(out)
  assert len(index) == len(ids) - 2
  assert ids[3] not in index.image_ids and ids[5] not in index.image_ids
  lists = ("train_val_list.txt", "test_list.txt")
  listed = [i for n in lists for i in (out / n).read_text().split()]
  assert sorted(listed) == sorted(set(ids) - {ids[3], ids[5]})
  assert all(p is not None for p in index.image_paths)


def test_cli_error_exit_code_names_file(tmp_path, capsys, write_nih_folder):
  ids = write_nih_folder(tmp_path / "nih", patients=3)
  (tmp_path / "nih" / "images" / ids[0]).unlink()
  argv = ["--nih-dir", str(tmp_path / "nih"), "--out", str(tmp_path / "o"), "--workers", "0"]
  rc = cli.main(["prepare", *argv])
  err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then the one line
  errors = [line for line in err if line.startswith("lsemil ")]
  assert rc == 1 and errors == err[-1:] and errors[0].startswith("lsemil prepare: ")
  assert ids[0] in errors[0] and "not found" in errors[0]
  # The command module itself raises the error (the CLI prints it).
  with pytest.raises(PrepareError, match=ids[0].replace(".", r"\.")):
    prepare.main(argv)


# --------------------------------------------------------------------------- resumable


def test_resume_skips_done_and_distrusts_temp_files(tmp_path, write_nih_folder):
  ids = write_nih_folder(tmp_path / "nih", patients=3)
  out = tmp_path / "out"
  first = preparation.prepare(tmp_path / "nih", out, workers=0, progress=False)
  assert first.written == len(ids)
  images = out / "images"
  stamps = {p.name: p.stat().st_mtime_ns for p in images.iterdir()}
  # An interrupted run: one output never renamed (only its half-written temp file exists).
  half = images / f".{ids[2]}.999.tmp"
  half.write_bytes((images / ids[2]).read_bytes()[:300])
  (images / ids[2]).unlink()
  (out / "lsemil_dataset.json").unlink()
  second = preparation.prepare(tmp_path / "nih", out, workers=0, progress=False)
  assert (second.written, second.already_done, second.stale_temp_removed) == (1, len(ids) - 1, 1)
  assert not half.exists()
  imageio.read_gray(images / ids[2])  # complete again
  for name, stamp in stamps.items():
    if name != ids[2]:
      assert (images / name).stat().st_mtime_ns == stamp, name
  assert (out / "lsemil_dataset.json").is_file()
  with pytest.raises(PrepareError, match="image_size=512, not 256"):
    preparation.prepare(tmp_path / "nih", out, size=256, workers=0, progress=False)


# --------------------------------------------------------------------------- tfds


def test_tfds_round_trip_pixel_equal_to_png(raw_dir, png_dir, tmp_path):
  import tensorflow_datasets as tfds

  from lsemil.data import tfds_builder

  out = tmp_path / "tf"
  preparation.prepare(raw_dir, out, fmt="tfds", workers=2, progress=False)
  marker = json.loads((out / "lsemil_dataset.json").read_text())
  assert (marker["kind"], marker["format"], marker["image_size"]) == ("prepared", "tfds", 512)
  assert not (out / preparation.STAGING_NAME).exists() and not (out / "images").exists()
  index = nih.load_index(out)
  assert index.image_ids == nih.load_index(png_dir).image_ids
  data_dir = tfds_builder.dataset_dir(out)
  for split in ("train", "valid", "test"):
    source = tfds.data_source(
      f"{tfds_builder.NAME}/{data_dir.parent.name}", split=split, data_dir=str(out / "tfds")
    )
    rows = index.rows(split)
    assert len(source) == len(rows) > 0
    for pos, row in enumerate(rows):
      rec = source[pos]
      assert rec["image_id"].decode() == index.image_ids[row]
      np.testing.assert_array_equal(rec["labels"], index.labels[row])
      png = imageio.read_gray(png_dir / "images" / index.image_ids[row])
      np.testing.assert_array_equal(imageio.decode_png(rec["png"]), png)


# --------------------------------------------------------------------------- other sources


def _csv_folder(root: Path) -> None:
  """A `csv`-source folder: four 40x64 (H x W) PNGs, labels 1 / 0 / -1 / blank, one box."""
  (root / "images").mkdir(parents=True)
  for k in range(4):
    cv2.imwrite(str(root / "images" / f"x{k}.png"), np.full((40, 64), 40 * k, np.uint8))
  (root / "labels.csv").write_text(
    "path,patient,split,Edema,Mass\n"
    "images/x0.png,p0,train,1,-1\nimages/x1.png,p1,train,,0\n"
    "images/x2.png,p2,valid,0,1\nimages/x3.png,p3,test,-1,\n"
  )
  (root / "boxes.csv").write_text("path,class,x,y,w,h\nimages/x2.png,Mass,16,10,32,20\n")


def test_prepared_source_keeps_classes_unknown_labels_split_and_scales_boxes(tmp_path):
  from lsemil.data import pipeline, sources

  raw, out = tmp_path / "raw", tmp_path / "out"
  _csv_folder(raw)
  policies = {"uncertain": "ignore", "blank": "ignore"}
  preparation.prepare(raw, out, size=32, workers=1, progress=False, source="csv",
                      policies=policies)
  marker = json.loads((out / "lsemil_dataset.json").read_text())
  assert (marker["source"], marker["classes"], marker["images"]) == ("csv", ["Edema", "Mass"], 4)
  assert (out / "index.csv").read_text().splitlines()[1:3] == [
    "images/x0.png,images/images__x0.png,p0,train,1,",
    "images/x1.png,images/images__x1.png,p1,train,,0",
  ]
  got = pipeline.open_index(out, source="csv", **policies)
  want = sources.load("csv", raw, **policies)
  assert got.classes == want.classes == ("Edema", "Mass")
  assert got.image_ids == want.image_ids
  np.testing.assert_array_equal(got.labels, [[1, np.nan], [np.nan, 0], [0, 1], [np.nan, np.nan]])
  np.testing.assert_array_equal(got.splits, want.splits)
  # x by 32/64, y by 32/40: a box scales with its (non-square) image
  np.testing.assert_allclose(got.box_xywh, [[8.0, 8.0, 16.0, 16.0]])
  valid = pipeline.open_source(out, "valid", source="csv")
  assert valid.classes == ("Edema", "Mass") and valid[0]["image"].shape == (32, 32)
  np.testing.assert_array_equal(valid.labels, [[0, 1]])
  with pytest.raises(nih.DataError, match=r"prepared with blank='ignore'.*data\.blank"):
    pipeline.open_source(out, "train", source="csv", blank="zeros")
  with pytest.raises(nih.DataError, match="prepared from source 'csv', not 'nih'"):
    pipeline.open_source(out, "train")
