"""Tests of the synthetic NIH-layout dataset (lsemil.data.phantoms).

The dataset must go through the same loader as the real release (paper Section 4.1), carry
the labels that were planted, put each box exactly around its finding's pixels, and be
deterministic per (seed, image) whatever the worker count.
"""

from __future__ import annotations

import gzip
import json

import cv2
import numpy as np
import pytest

from lsemil.commands import cli
from lsemil.data import phantoms
from lsemil.data.nih import BOX_CLASSES, CLASSES, DataError, load_index

SIZE = 512  # the synth_dir fixture's image size
SEED = 0


@pytest.fixture(scope="module")
def index(synth_dir):
  return load_index(synth_dir)


@pytest.fixture(scope="module")
def specs(synth_dir):
  marker = json.loads((synth_dir / "lsemil_dataset.json").read_text())
  return {s.image_id: s for s in phantoms.plan(marker["patients"], marker["seed"])}


def test_layout_and_marker(synth_dir, index, specs):
  marker = json.loads((synth_dir / "lsemil_dataset.json").read_text())
  assert marker["kind"] == "synthetic"
  assert marker["image_size"] == marker["box_space"] == SIZE
  assert index.kind == "synthetic" and index.box_space == SIZE and index.official_split
  assert set(index.image_ids) == set(specs)
  assert all(p is not None and p.parent == synth_dir / "images" for p in index.image_paths)
  assert sorted(p.name for p in (synth_dir / "images").iterdir()) == sorted(specs)
  assert index.warnings == ()
  img = cv2.imread(str(index.image_paths[0]), cv2.IMREAD_UNCHANGED)
  assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE)


def test_labels_match_what_was_planted(index, specs):
  for i, image_id in enumerate(index.image_ids):
    assert np.flatnonzero(index.labels[i]).tolist() == list(specs[image_id].classes)
    assert index.patient_ids[i] == specs[image_id].patient
  # Several images per patient, and some with several findings.
  assert len(index) > len(index.patients())
  assert index.labels.sum(axis=1).max() > 1


def test_split_is_patient_wise(synth_dir, index, specs):
  test_list = set((synth_dir / "test_list.txt").read_text().split())
  tv_list = set((synth_dir / "train_val_list.txt").read_text().split())
  assert test_list | tv_list == set(specs) and not test_list & tv_list
  owners = {}
  for pid, split in zip(index.patient_ids.tolist(), index.splits.tolist(), strict=True):
    assert owners.setdefault(pid, split) == split
  assert {specs[i].split for i in test_list} == {"test"}


def test_headers_match_the_real_release(synth_dir, nih_metadata_dir):
  for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv"):
    with gzip.open(nih_metadata_dir / f"{name}.gz", "rt", newline="") as f:
      real = f.readline()
    with open(synth_dir / name, newline="") as f:
      ours = f.readline()
    assert ours == real


def test_boxes_are_written_for_every_test_finding_of_a_box_class(synth_dir, index, specs):
  text = (synth_dir / "BBox_List_2017.csv").read_text()
  assert "Infiltrate," in text or not any(
    CLASSES.index("Infiltration") in s.classes and s.split == "test" for s in specs.values()
  )
  assert "Infiltration," not in text
  want = sorted(
    (s.image_id, c) for s in specs.values() if s.split == "test"
    for c in s.classes if CLASSES[c] in BOX_CLASSES
  )
  got = sorted(
    (index.image_ids[r], int(c)) for r, c in zip(index.box_rows, index.box_classes, strict=True)
  )
  assert got == want and len(want) > 0


def test_boxes_enclose_exactly_the_changed_pixels(index, specs):
  for r, c, xywh in zip(index.box_rows, index.box_classes, index.box_xywh, strict=True):
    spec = specs[index.image_ids[r]]
    with_finding, _ = phantoms.render_image(spec, size=SIZE, seed=SEED, findings=(int(c),))
    without, _ = phantoms.render_image(spec, size=SIZE, seed=SEED, findings=())
    ys, xs = np.nonzero(with_finding != without)
    x, y, w, h = xywh.astype(int)
    # The changed pixels lie in the box and reach (almost) all of its sides.
    assert x <= xs.min() and xs.max() < x + w and y <= ys.min() and ys.max() < y + h
    assert xs.min() - x <= 2 and x + w - 1 - xs.max() <= 2
    assert ys.min() - y <= 2 and y + h - 1 - ys.max() <= 2


def test_regenerated_image_is_identical(index, specs):
  for i in (0, len(index) // 2, len(index) - 1):
    stored = cv2.imread(str(index.image_paths[i]), cv2.IMREAD_UNCHANGED)
    drawn, _ = phantoms.render_image(specs[index.image_ids[i]], size=SIZE, seed=SEED)
    np.testing.assert_array_equal(stored, drawn)


def test_bytes_independent_of_worker_count_and_patient_count(tmp_path, synth_dir):
  out = phantoms.synthesize(tmp_path / "small", patients=3, size=SIZE, seed=SEED, workers=2,
                         progress=False)
  names = sorted(p.name for p in (out / "images").iterdir())
  assert names and all(n.startswith(("00000001_", "00000002_", "00000003_")) for n in names)
  for n in names:
    assert (out / "images" / n).read_bytes() == (synth_dir / "images" / n).read_bytes()


def test_seed_changes_the_dataset():
  a, b = phantoms.plan(40, 0), phantoms.plan(40, 1)
  assert [s.classes for s in a] != [s.classes for s in b]
  spec = next(s for s in a if s.classes)
  img0, _ = phantoms.render_image(spec, size=SIZE, seed=0)
  img1, _ = phantoms.render_image(spec, size=SIZE, seed=1)
  assert np.mean(img0 != img1) > 0.5


def test_resume_restores_missing_files_and_refuses_other_settings(tmp_path):
  out = phantoms.synthesize(
    tmp_path / "d", patients=2, size=SIZE, seed=5, workers=1, progress=False
  )
  images = sorted((out / "images").iterdir())
  victim, kept = images[0], images[-1]
  original = victim.read_bytes()
  kept_mtime = kept.stat().st_mtime_ns
  victim.unlink()
  (out / "Data_Entry_2017_v2020.csv").unlink()
  (out / "images" / f".{victim.name}.tmp999").write_bytes(b"partial")  # an interrupted write
  phantoms.synthesize(out, patients=2, size=SIZE, seed=5, workers=1, progress=False)
  assert victim.read_bytes() == original
  assert kept.stat().st_mtime_ns == kept_mtime  # finished images are not rewritten
  assert len(load_index(out)) == len(images)
  assert not [p for p in out.rglob(".*tmp*")]
  with pytest.raises(ValueError, match="seed"):
    phantoms.synthesize(out, patients=2, size=SIZE, seed=6, workers=1, progress=False)


def test_plan_prevalence():
  specs = phantoms.plan(600, SEED)
  assert 1300 <= len(specs) <= 1700
  per_patient = np.bincount([s.patient for s in specs])[1:]
  assert per_patient.min() >= 1 and per_patient.max() <= 4
  counts = np.array([len(s.classes) for s in specs])
  assert counts.max() <= 3 and 0.3 <= np.mean(counts == 0) <= 0.5
  prevalence = np.zeros(len(CLASSES))
  for s in specs:
    prevalence[list(s.classes)] += 1
  prevalence /= len(specs)
  assert prevalence.min() >= 0.04 and prevalence.max() <= 0.16, prevalence


@pytest.mark.parametrize("cls", range(len(CLASSES)), ids=CLASSES)
def test_each_class_is_visible_at_128(cls):
  # The demo trains at 128x128: every finding must still change the downsampled image.
  for patient in range(500, 506):
    spec = phantoms.ImageSpec(f"{patient:08d}_000.png", patient, 0, (cls,), "test", 40, "F", "PA")
    img, boxes = phantoms.render_image(spec, size=SIZE, seed=SEED)
    base, _ = phantoms.render_image(spec, size=SIZE, seed=SEED, findings=())
    small = [cv2.resize(a, (128, 128), interpolation=cv2.INTER_AREA) for a in (img, base)]
    diff = np.abs(small[0].astype(int) - small[1])
    assert diff.max() >= 25 and (diff >= 10).sum() >= 20
    assert min(boxes[cls][2:]) >= 5 * SIZE / 128


def test_render_rejects_unplanted_findings():
  spec = phantoms.ImageSpec("00000001_000.png", 1, 0, (2,), "test", 40, "F", "PA")
  with pytest.raises(ValueError, match="not all planted"):
    phantoms.render_image(spec, size=SIZE, seed=SEED, findings=(3,))


def test_cli(tmp_path, capsys):
  argv = ["synth", "--out", str(tmp_path / "cli"), "--patients", "1", "--workers", "1"]
  assert cli.main(argv) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
  assert len(load_index(tmp_path / "cli")) >= 1
  # Other settings into the same folder: one line naming the folder and the settings, exit 1.
  assert cli.main([*argv, "--seed", "1"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("lsemil synth: " + str(tmp_path / "cli"))
  assert "'seed': 0" in err[0] and "'seed': 1" in err[0]
  with pytest.raises(SystemExit) as e:
    cli.main(["synth", "--help"])
  assert e.value.code == 0
  with pytest.raises(SystemExit) as e:
    cli.main(["synth", "--out", str(tmp_path / "x"), "--patients", "0"])
  assert e.value.code == 2 and "--patients must be >= 1" in capsys.readouterr().err


def test_loader_checks_apply_to_synthetic_boxes(tmp_path):
  out = phantoms.synthesize(
    tmp_path / "d", patients=6, size=SIZE, seed=2, workers=1, progress=False
  )
  bbox = out / "BBox_List_2017.csv"
  lines = bbox.read_text().splitlines()
  assert len(lines) > 1
  parts = lines[1].split(",")
  parts[2] = str(SIZE - 1.0)  # pushes the box past the 512-pixel edge
  bbox.write_text("\n".join([lines[0], ",".join(parts)] + lines[2:]) + "\n")
  with pytest.raises(DataError, match=r"BBox_List_2017.csv:2: .*512x512"):
    load_index(out)
