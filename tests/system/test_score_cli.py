"""`lsemil score` on maps written here (no lsemil run): its files, eval.py's bootstrap recomputed
from its per-image file, masks (COCO RLE) scoring as the boxes they draw, and a one-line error
naming the image."""

from __future__ import annotations

import csv
import json

import numpy as np
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
  md = (tmp_path / "out" / "scores.md").read_text().splitlines()
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
           "--out", tmp_path / truth, "--n-boot", "50")  # fmt: skip
  assert (tmp_path / "--masks" / "scores.csv").read_text() == (
    tmp_path / "--boxes" / "scores.csv"
  ).read_text()
