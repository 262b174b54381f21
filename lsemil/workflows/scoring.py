"""Scoring any model's saliency maps with cheXlocalize's protocols (`lsemil score`).

Inputs:
- maps (`read_maps`): an .npz holding image_ids (N) strings, classes (C) strings, maps
  (N, C, h, w) floats (any range: the protocols min-max scale each map), optionally probs
  (N, C), image_sizes (N, 2) as (height, width) of the original images (default: the maps'
  own h, w) and patient_ids (N) (the key of the tuning split; default: the image ids); or a
  folder of such files (e.g. one per image).
- boxes (`read_boxes`): a CSV with the header image_id,class,x,y,w,h, boxes in the original
  image's pixels, x the column; a pixel is inside when its centre lies in the half-open box
  (`lsemil.metrics.overlap`'s rule at scale 1);
- or masks (`read_masks`): cheXlocalize's ground-truth JSON, {image id: {class: COCO RLE}}
  (`rle_mask` decodes pycocotools' compressed strings), each mask of its image's size.

Scored (`score`): every image of the npz for every class with a box (a non-empty mask), through
`lsemil.metrics.chexlocalize` (cheXlocalize's official steps; an image without a box of the
class is a negative: NaN in the true-positive-only protocols, counted by the all-images ones).
The tuning half is `lsemil.metrics.localization.tuning_half` of the patient (or image) id, as
in `lsemil evaluate`.

Outputs (`write_outputs`): scores.csv (protocol,class,value,ci_low,ci_high,n), scores.json
({protocol: {class: entry}, 'settings'}, strict JSON), scores.md (classes x protocols) and
optionally per_image.csv (image_id,class,tuning,iou_otsu,iou_otsu_all,iou_tuned,iou_cutoff,
hit).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os

import numpy as np

from lsemil.core import fileio, tables
from lsemil.core.errors import DataError
from lsemil.metrics import chexlocalize, localization

BOX_HEADER = ("image_id", "class", "x", "y", "w", "h")
PER_IMAGE = ("otsu", "otsu_all", "tuned", "cut", "hit")  # chexlocalize per_image tables


@dataclasses.dataclass(frozen=True)
class MapSet:
  """The contents of a maps .npz (see the module docstring)."""

  image_ids: tuple[str, ...]
  classes: tuple[str, ...]
  maps: np.ndarray | list  # (N, C, h, w), or N (C, h, w) arrays
  probs: np.ndarray | None  # (N, C)
  image_sizes: np.ndarray  # (N, 2) height, width
  patient_ids: tuple[str, ...]


def read_maps(path: str | os.PathLike) -> MapSet:
  """The maps .npz, or a folder of them (e.g. one per image, N = 1; the same classes in each,
  maps of any size); a DataError names the file and the field at fault."""
  path = fileio.as_path(path)
  if not path.is_dir():
    return _read_npz(path)
  files = sorted(path.glob("*.npz"))
  if not files:
    raise DataError(f"{path}: a folder without .npz files")
  parts = [_read_npz(f) for f in files]
  for f, part in zip(files, parts, strict=True):
    if part.classes != parts[0].classes:
      raise DataError(f"{f}: classes {part.classes} differ from {files[0].name}'s")
  ids = tuple(im for part in parts for im in part.image_ids)
  if len(set(ids)) < len(ids):
    raise DataError(f"{path}: an image id stands in more than one file")
  has_probs = all(part.probs is not None for part in parts)
  return MapSet(
    ids,
    parts[0].classes,
    [m for part in parts for m in part.maps],
    np.concatenate([part.probs for part in parts]) if has_probs else None,
    np.concatenate([part.image_sizes for part in parts]),
    tuple(pid for part in parts for pid in part.patient_ids),
  )


def _read_npz(path) -> MapSet:
  try:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
      fields = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a readable .npz ({e})") from e
  for key in ("image_ids", "classes", "maps"):
    if key not in fields:
      raise DataError(f"{path}: no {key!r} array (has {sorted(fields)})")
  ids = tuple(str(v) for v in fields["image_ids"])
  classes = tuple(str(v) for v in fields["classes"])
  maps = fields["maps"]
  n, c = len(ids), len(classes)
  if maps.ndim != 4 or maps.shape[:2] != (n, c):
    raise DataError(f"{path}: maps must be (N={n}, C={c}, h, w), got {maps.shape}")
  probs = fields.get("probs")
  if probs is not None:
    probs = np.asarray(probs, np.float64)
    if probs.shape != (n, c):
      raise DataError(f"{path}: probs must be (N={n}, C={c}), got {probs.shape}")
    bad = np.argwhere(~np.isfinite(probs))
    if len(bad):
      i, k = bad[0]
      raise DataError(f"{path}: image {ids[i]}: the probability of {classes[k]} is {probs[i, k]}")
  sizes = fields.get("image_sizes")
  sizes = np.tile(maps.shape[2:], (n, 1)) if sizes is None else np.asarray(sizes)
  if sizes.shape != (n, 2) or (sizes < 1).any():
    raise DataError(f"{path}: image_sizes must be (N={n}, 2) positive (height, width)")
  patients = fields.get("patient_ids")
  patients = ids if patients is None else tuple(str(v) for v in patients)
  if len(patients) != n:
    raise DataError(f"{path}: patient_ids must hold N={n} values, got {len(patients)}")
  return MapSet(ids, classes, maps, probs, sizes.astype(np.int64), patients)


def read_boxes(path: str | os.PathLike, maps: MapSet) -> dict[tuple[str, str], list]:
  """{(image_id, class): [(x, y, w, h), ...]} of the boxes CSV; a DataError names the line of
  a bad row, an unknown image or class, or a box outside its image."""
  path = fileio.as_path(path)
  rows = list(csv.reader(io.StringIO(path.read_text())))
  if not rows or tuple(v.strip() for v in rows[0]) != BOX_HEADER:
    raise DataError(f"{path}: the header must be {','.join(BOX_HEADER)}")
  where = {im: i for i, im in enumerate(maps.image_ids)}
  out: dict[tuple[str, str], list] = {}
  for line, r in enumerate(rows[1:], start=2):
    if not r:
      continue
    try:
      im, cls, *xywh = (v.strip() for v in r)
      x, y, w, h = (float(v) for v in xywh)
    except ValueError as e:
      raise DataError(f"{path} line {line}: expected {','.join(BOX_HEADER)} ({e})") from e
    if im not in where or cls not in maps.classes:
      raise DataError(f"{path} line {line}: image {im!r} or class {cls!r} is not in the maps")
    hgt, wid = maps.image_sizes[where[im]]
    if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0 or x < 0 or y < 0:
      raise DataError(f"{path} line {line}: a box needs finite x, y >= 0 and w, h > 0")
    if x + w > wid or y + h > hgt:
      raise DataError(f"{path} line {line}: the box leaves the {wid}x{hgt} image {im}")
    out.setdefault((im, cls), []).append((x, y, w, h))
  return out


def boxes_mask(boxes, hw) -> np.ndarray:
  """Boolean (H, W) union of boxes (x, y, w, h) in image pixels: column j is inside when
  x <= j + 0.5 < x + w (rows likewise)."""
  mask = np.zeros(tuple(int(v) for v in hw), bool)
  for x, y, w, h in boxes:
    c0, c1 = math.ceil(x - 0.5), math.ceil(x + w - 0.5)
    r0, r1 = math.ceil(y - 0.5), math.ceil(y + h - 0.5)
    mask[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)] = True
  return mask


def rle_counts(text: str) -> list[int]:
  """The run lengths of a compressed COCO RLE string (pycocotools maskApi.c rleFrString)."""
  counts: list[int] = []
  p = 0
  while p < len(text):
    x = k = 0
    more = True
    while more:
      c = ord(text[p]) - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p, k = p + 1, k + 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    counts.append(x + counts[-2] if len(counts) > 2 else x)
  return counts


def rle_mask(rle, name="mask") -> np.ndarray:
  """A COCO RLE {'size': [h, w], 'counts': string or list} as a boolean (h, w) mask, as
  pycocotools mask.decode: runs alternate from 0s, column-major."""
  try:
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    counts = rle_counts(counts) if isinstance(counts, str) else [int(v) for v in counts]
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{name}: not a COCO RLE {{'size': [h, w], 'counts': ...}} ({e})") from e
  if min(counts, default=0) < 0 or sum(counts) != h * w:
    raise DataError(f"{name}: its runs cover {sum(counts)} pixels, not {h}x{w}")
  flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
  return flat.reshape(w, h).T


def read_masks(path: str | os.PathLike, maps: MapSet) -> dict[tuple[str, str], np.ndarray]:
  """{(image_id, class): mask} of a cheXlocalize ground-truth JSON ({image id: {class: COCO
  RLE}}); a mask must have its image's size (`MapSet.image_sizes`)."""
  path = fileio.as_path(path)
  try:
    data = fileio.read_json(path)
  except ValueError as e:
    raise DataError(f"{path}: not JSON ({e})") from e
  where = {im: i for i, im in enumerate(maps.image_ids)}
  out = {}
  for im, by_cls in data.items() if isinstance(data, dict) else ():
    if im not in where:
      continue  # an image without maps: nothing to score
    for cls, rle in by_cls.items():
      if cls not in maps.classes:
        continue
      mask = rle_mask(rle, f"{path}: {im}, {cls}")
      hw = tuple(int(v) for v in maps.image_sizes[where[im]])
      if mask.shape != hw:
        raise DataError(f"{path}: {im}, {cls}: a {mask.shape} mask for a {hw} image")
      out[(im, cls)] = mask
  if not out:
    raise DataError(f"{path}: no mask of an image and class of the maps")
  return out


def score(
  maps: MapSet,
  boxes: dict | None = None,
  n_boot: int = chexlocalize.N_REPLICATES,
  seed: int = 0,
  masks: dict | None = None,
):
  """`chexlocalize.split_results` (all_images) of every image for every class with a box
  (`read_boxes`) or a mask (`read_masks`; a class's images without one have none)."""
  if masks is not None:
    classes = [k for k in maps.classes if any(m.any() for (_, c), m in masks.items() if c == k)]
  else:
    classes = [k for k in maps.classes if any(cls == k for _, cls in boxes or {})]
  cases = []
  for i, im in enumerate(maps.image_ids):
    tune = localization.tuning_half(maps.patient_ids[i])
    for k in classes:
      j = maps.classes.index(k)
      if masks is not None:
        gt = masks.get((im, k), np.zeros(tuple(maps.image_sizes[i]), bool))
      else:
        gt = boxes_mask(boxes.get((im, k), ()), maps.image_sizes[i])
      sc = chexlocalize.case_scores(maps.maps[i][j], gt, f"image {im}, class {k}")
      prob = None if maps.probs is None else float(maps.probs[i, j])
      cases.append((im, k, tune, sc, prob))
  result = chexlocalize.split_results(cases, n_boot, seed, all_images=True)
  result["settings"] = {
    "n_boot": int(n_boot),
    "seed": int(seed),
    "n_images": len(maps.image_ids),
    "classes": classes,
    "tuning": "the tuning half: first byte of sha256(str(patient id)) even",
  }
  return result


def write_outputs(result: dict, out_dir, per_image: bool = False) -> list:
  """scores.csv, scores.json and (per_image) per_image.csv in out_dir; their paths."""
  out = fileio.as_path(out_dir)
  protocols = {k: v for k, v in result.items() if k.startswith("chexlocalize_")}
  rows = [
    [p, c, *(_num(e[key]) for key in ("value", "lo", "hi")), e["n"]]
    for p, by_cls in protocols.items()
    for c, e in by_cls.items()
  ]
  header = ["protocol", "class", "value", "ci_low", "ci_high", "n"]
  paths = [out / "scores.csv", out / "scores.json", out / "scores.md"]
  fileio.write_text(paths[0], tables.csv_text(header, rows))
  fileio.write_json(paths[1], {**protocols, "settings": result["settings"]})
  fileio.write_text(paths[2], markdown(protocols))
  if per_image:
    t = result["per_image"]
    body = [
      [im, c, int(t["tuning"][i]), *(_num(t[key][i, j]) for key in PER_IMAGE)]
      for i, im in enumerate(t["images"])
      for j, c in enumerate(t["classes"])
    ]
    names = ["iou_otsu", "iou_otsu_all", "iou_tuned", "iou_cutoff", "hit"]
    paths.append(out / "per_image.csv")
    fileio.write_text(paths[-1], tables.csv_text(["image_id", "class", "tuning", *names], body))
  return paths


def markdown(protocols: dict) -> str:
  """Classes x protocols, 'value (lo-hi)' to 3 decimals ('-' where undefined)."""
  names = list(protocols)
  classes = list(dict.fromkeys(c for by_cls in protocols.values() for c in by_cls))

  def cell(e) -> str:
    if e is None or _num(e["value"]) == "":
      return "-"
    ci = f" ({e['lo']:.3f}-{e['hi']:.3f})" if _num(e["lo"]) and _num(e["hi"]) else ""
    return f"{e['value']:.3f}{ci}"

  body = [[c, *(cell(protocols[p].get(c)) for p in names)] for c in classes]
  return tables.markdown(["class", *names], body)


def _num(v) -> str:
  return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.10g}"
