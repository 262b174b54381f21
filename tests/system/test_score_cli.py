"""`lsemil score` on maps written here (no lsemil run): its files, eval.py's bootstrap recomputed
from its per-image file, masks (COCO RLE) scoring as the boxes they draw, and a one-line error
naming the image."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from pycocotools import mask as mask_api

from lsemil.workflows import scoring


def write_inputs(tmp_path, nan_at=None):
  rng = np.random.default_rng(0)
  n, classes = 24, ["Mass", "Nodule"]
  sizes = np.array([(60, 80) if i % 2 else (70, 50) for i in range(n)])
  maps = rng.random((n, 2, 7, 9)).astype(np.float32)
  lines = ["image_id,class,x,y,w,h"]
  for i in range(n):
    for j, c in enumerate(classes):
      if rng.random() < 0.6:
        h, w = sizes[i]
        x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        lines.append(f"im{i:02d},{c},{x:.2f},{y:.2f},{w / 3:.2f},{h / 3:.2f}")
        maps[i, j, 1:4, 1:4] += 1.0  # a hot spot, not always inside the box
  if nan_at is not None:
    maps[nan_at] = np.nan
  np.savez(
    tmp_path / "maps.npz",
    image_ids=np.array([f"im{i:02d}" for i in range(n)]),
    classes=np.array(classes),
    maps=maps,
    probs=rng.random((n, 2)),
    image_sizes=sizes,
  )
  (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")


def test_score_writes_eval_py_numbers(tmp_path, lsemil):
  write_inputs(tmp_path)
  proc = lsemil(
    "score", "--maps", tmp_path / "maps.npz", "--boxes", tmp_path / "boxes.csv",
    "--out", tmp_path / "out", "--per-image", "--n-boot", "100", "--seed", "3",
  )  # fmt: skip
  assert "| chexlocalize_miou_otsu |" in proc.stdout
  scores = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
  per = list(csv.DictReader((tmp_path / "out" / "per_image.csv").open()))
  assert list(scores[0]) == ["protocol", "class", "value", "ci_low", "ci_high", "n"]
  assert {r["protocol"] for r in scores} >= {
    "chexlocalize_miou_otsu", "chexlocalize_miou_tuned", "chexlocalize_hit_rate",
    "chexlocalize_miou_otsu_all", "chexlocalize_miou_otsu_cutoff",
  }  # fmt: skip
  assert (tmp_path / "out" / "scores.json").exists() and len(per) == 48
  md = (tmp_path / "out" / "scores.md").read_text().split("\n\n")[0].splitlines()
  assert md[0].startswith("| class | chexlocalize_miou_otsu |") and len(md) == 4
  # eval.py on the per-image table: rows = images sorted by id, both classes drawn together
  images = sorted({r["image_id"] for r in per})
  for column, protocol in [
    ("iou_otsu", "chexlocalize_miou_otsu"),
    ("hit", "chexlocalize_hit_rate"),
  ]:
    table = np.full((len(images), 2), np.nan)
    for r in per:
      j = ["Mass", "Nodule"].index(r["class"])
      table[images.index(r["image_id"]), j] = float(r[column]) if r[column] else np.nan
    np.random.seed(3)
    reps = np.array([np.nanmean(table[np.random.choice(24, 24)], axis=0) for _ in range(100)])
    for j, c in enumerate(["Mass", "Nodule"]):
      row = next(r for r in scores if r["protocol"] == protocol and r["class"] == c)
      col = np.sort(reps[:, j])
      assert float(row["value"]) == np.float64(f"{col.mean():.10g}")
      assert float(row["ci_low"]) == np.float64(f"{col[1]:.10g}")  # int(0.025 * 100) - 1
      assert float(row["ci_high"]) == np.float64(f"{col[96]:.10g}")  # int(0.975 * 100) - 1


def test_score_non_finite_map_is_one_error_naming_the_image(tmp_path, lsemil):
  write_inputs(tmp_path, nan_at=(5, 1))
  proc = lsemil.run(
    "score", "--maps", tmp_path / "maps.npz", "--boxes", tmp_path / "boxes.csv",
    "--out", tmp_path / "out",
  )  # fmt: skip
  assert "image im05, class Nodule" in lsemil.one_error(proc, "score")


def test_score_masks_json_gives_the_boxes_numbers(tmp_path, lsemil):
  write_inputs(tmp_path)
  z = np.load(tmp_path / "maps.npz")
  rows = list(csv.DictReader((tmp_path / "boxes.csv").open()))
  gt = {}
  for im, hw in zip(z["image_ids"], z["image_sizes"], strict=True):
    for c in z["classes"]:
      b = [
        tuple(float(r[k]) for k in "xywh") for r in rows if (r["image_id"], r["class"]) == (im, c)
      ]
      rle = mask_api.encode(np.asfortranarray(scoring.boxes_mask(b, hw).astype(np.uint8)))
      gt.setdefault(str(im), {})[str(c)] = {"size": rle["size"], "counts": rle["counts"].decode()}
  (tmp_path / "gt.json").write_text(json.dumps(gt))
  for truth, path in (("--boxes", "boxes.csv"), ("--masks", "gt.json")):
    lsemil("score", "--maps", tmp_path / "maps.npz", truth, tmp_path / path,
           "--out", tmp_path / truth, "--n-boot", "50", "--protocol", "chexlocalize")  # fmt: skip
  assert (tmp_path / "--masks" / "scores.csv").read_text() == (
    tmp_path / "--boxes" / "scores.csv"
  ).read_text()


def test_score_detection_protocols_of_exact_maps(tmp_path, lsemil):
  """Maps whose hot block is exactly each box (64 px images, 16 px maps: boxes_from_map's
  boxes are the truth), probabilities above 0.5 only for the image's classes: AP, loc-acc and
  RoDeO are perfect for both families; the same maps shifted off the boxes score AP 0."""
  rng = np.random.default_rng(1)
  n, classes = 12, ["Mass", "Nodule", "Effusion"]
  maps = rng.random((n, 3, 16, 16)) * 0.1
  probs = np.full((n, 3), 0.2)
  lines = ["image_id,class,x,y,w,h"]
  for i in range(n):
    for j in rng.choice(3, size=1 + i % 2, replace=False):
      r, c = rng.integers(0, 12, 2)
      maps[i, j, r : r + 4, c : c + 4] = 1.0
      probs[i, j] = 0.9
      lines.append(f"im{i:02d},{classes[j]},{4 * c},{4 * r},16,16")
  (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
  ids = np.array([f"im{i:02d}" for i in range(n)])
  patients = np.array([f"p{i // 2}" for i in range(n)])
  for name, m in (("exact", maps), ("shifted", np.roll(maps, 8, axis=3))):
    np.savez(tmp_path / f"{name}.npz", image_ids=ids, classes=np.array(classes), maps=m,
             probs=probs, image_sizes=np.full((n, 2), 64), patient_ids=patients)  # fmt: skip
  proc = lsemil("score", "--maps", tmp_path / "exact.npz", "--boxes", tmp_path / "boxes.csv",
                "--out", tmp_path / "out", "--n-boot", "0", "--protocol", "all")  # fmt: skip
  assert "| wsrpn_rodeo_total |" in proc.stdout
  got = {
    (r["protocol"], r["class"]): float(r["value"])
    for r in csv.DictReader((tmp_path / "out" / "scores.csv").open())
  }
  for fam in ("detection", "wsrpn"):
    for p in ("ap@0.3", "ap@0.5", "loc_acc@0.5", "rodeo_shape", "rodeo_classification"):
      assert got[f"{fam}_{p}", "(all)"] == 1.0, (fam, p)
    assert got[f"{fam}_rodeo_total", "(all)"] == pytest.approx(1.0, abs=1e-5)
  shifted = scoring.read_maps(tmp_path / "shifted.npz")
  res = scoring.score(shifted, scoring.read_boxes(tmp_path / "boxes.csv", shifted), 0,
                      protocols=("detection",))  # fmt: skip
  assert res["detection_ap@0.3"]["(all)"]["value"] == 0.0
  page = (tmp_path / "out" / "scores.html").read_text()
  assert "wsrpn_ap@0.5" in page and "http" not in page.replace("http-equiv", "")
