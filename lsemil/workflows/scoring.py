"""Any model's saliency maps scored: cheXlocalize's protocols, detection metrics (`lsemil score`).

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
  (`chexlocalize_truth.rle_mask` decodes pycocotools' compressed strings), each mask of its
  image's size;
- or a dataset folder (`truth_from_source`): the boxes or masks of a `lsemil.data.sources`
  reader, matched to the maps by image id.

Scored (`score`, the families of `PROTOCOLS`), over the classes with a box (a non-empty mask):
- chexlocalize: every image of the npz for every such class, through
  `lsemil.metrics.chexlocalize` (cheXlocalize's official steps; an image without a box of the
  class is a negative: NaN in the true-positive-only protocols, counted by the all-images
  ones). The tuning half is `lsemil.metrics.localization.tuning_half` of the patient (or
  image) id, as in `lsemil evaluate`.
- detection (boxes only): every image; a class whose probability is above `PRESENT` (WSRPN's
  predicted classes; every class without probs) gets the boxes of `detection.map_boxes` at
  tau 0.5 (`predict --boxes`'s box_tau), each scored peak x probability; truth: the image's
  boxes. `lsemil.metrics.detection`: detection_ap@0.3/0.5 (COCOeval), detection_loc_acc@0.3/0.5
  (WSRPN's acc@T), detection_rodeo_{total,localization,shape,classification} (two classes or
  more). Class '(all)': the class mean (AP, loc-acc) or RoDeO's pooled value.
- wsrpn (boxes only): WSRPN's protocol (github.com/philip-mueller/wsrpn): the box images split
  patient-wise into validation and test halves (`detection.wsrpn_split`, from the box file's
  order and the patient ids), boxes at both of their CAM baselines' heatmap thresholds 60/255
  and 180/255 (src/conf/model/chexnet.yaml, lse_model.yaml) with only the highest-mean box per
  class kept (filter_top1_per_class), scored on the test half; an image without a predicted
  class has no box (WSRPN gives it a 1-pixel box of a random class with confidence 0).
  WSRPN tunes nothing on the validation half (it selects the training checkpoint there), so
  neither does this; its confidence is a mean-pooled objectness, here peak x probability;
  numbers are fractions where WSRPN's table shows percent.
Detection values are the mean of image-bootstrap replicates (`image_draws`) with their 2.5 and
97.5% quantiles, as WSRPN's DetectionMetricsWithBootstrap reports them (it draws 250 with
torch's generator; here n_boot with numpy's), 'point' the full set's value.

Outputs (`write_outputs`): scores.csv (protocol,class,value,ci_low,ci_high,n), scores.json
({protocol: {class: entry}, 'settings'}, strict JSON), scores.md (classes x protocols, one
table per family), scores.html (the same tables, self-contained: `html_page.write_report`) and
optionally per_image.csv (image_id,class,tuning,iou_otsu,iou_otsu_all,iou_tuned,iou_cutoff,
hit; the chexlocalize family).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Sequence

import numpy as np

from lsemil.core import fileio, tables
from lsemil.core.errors import DataError
from lsemil.data import chexlocalize_truth, siim, sources
from lsemil.metrics import chexlocalize, detection, localization
from lsemil.reporting import html_page

BOX_HEADER = ("image_id", "class", "x", "y", "w", "h")
PROTOCOLS = ("chexlocalize", "detection", "wsrpn")
# the boxes of a map: binarization taus of the min-max scaled map, keep only the top box per class
BOX_RULES = {
  "detection": ((0.5,), False),  # predict --boxes's box_tau, every component
  "wsrpn": ((60 / 255, 180 / 255), True),  # WSRPN's heatmap_thresholds, filter_top1_per_class
}
IOUS = (0.3, 0.5)  # AP@T and loc-acc@T (WSRPN's table)
PRESENT = 0.5  # a class has boxes when its probability is above it (WSRPN: probs > 0.5)
ALL = "(all)"  # the class mean (AP, loc-acc) or the pooled value (RoDeO)
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
  sizes_given: bool = True  # False: image_sizes defaulted to the maps' own size


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
    all(part.sizes_given for part in parts),
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
  given = fields.get("image_sizes") is not None
  return MapSet(ids, classes, maps, probs, sizes.astype(np.int64), patients, given)


def read_boxes(
  path: str | os.PathLike, maps: MapSet, order: list | None = None
) -> dict[tuple[str, str], list]:
  """{(image_id, class): [(x, y, w, h), ...]} of the boxes CSV; a DataError names the line of
  a bad row, an unknown image or class, or a box outside its image. `order` (a list) gets
  each box's image id in file order."""
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
    if order is not None:
      order.append(im)
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
      mask = chexlocalize_truth.rle_mask(rle, f"{path}: {im}, {cls}")
      hw = tuple(int(v) for v in maps.image_sizes[where[im]])
      if mask.shape != hw:
        raise DataError(f"{path}: {im}, {cls}: a {mask.shape} mask for a {hw} image")
      out[(im, cls)] = mask
  if not out:
    raise DataError(f"{path}: no mask of an image and class of the maps")
  return out


def truth_from_source(maps: MapSet, source: str, data_dir, **options):
  """(maps, boxes, masks, box_order) of a dataset folder read by `lsemil.data.sources`: the
  boxes (or masks: siim-acr, chexlocalize) of the maps' images, by the source's class names;
  the maps take the source's patient ids, and where the npz gives no image sizes, the
  source's fixed size. box_order: one image id per box in the source's order (WSRPN's split).
  A DataError names a map image missing from the source or a size the truth contradicts."""
  idx = sources.load(source, data_dir, **options)
  row_of = {im: r for r, im in enumerate(idx.image_ids)}
  absent = [im for im in maps.image_ids if im not in row_of]
  if absent:
    raise DataError(
      f"{data_dir}: {len(absent)} map image(s) not in the {source} index, e.g. {absent[0]}"
    )
  sizes = maps.image_sizes
  if not maps.sizes_given and idx.image_size is not None:
    sizes = np.tile(idx.image_size, (len(maps.image_ids), 1))
  maps = dataclasses.replace(
    maps,
    image_sizes=sizes,
    patient_ids=tuple(str(idx.patient_ids[row_of[im]]) for im in maps.image_ids),
  )
  if idx.masks:
    decode = siim.mask if source == siim.NAME else chexlocalize_truth.mask
    masks = {}
    for i, im in enumerate(maps.image_ids):
      for k in idx.masks.get(row_of[im], {}):
        m = decode(idx, row_of[im], k)
        if m is not None and m.any():
          if m.shape != tuple(maps.image_sizes[i]):
            raise DataError(
              f"{im}: a {m.shape} mask of {idx.classes[k]} for a {tuple(maps.image_sizes[i])} image"
            )
          masks[(im, idx.classes[k])] = m
    return maps, None, masks, []
  boxes: dict = {}
  order = []
  wanted = set(maps.image_ids)
  for r, k, xywh in zip(idx.box_rows, idx.box_classes, idx.box_xywh, strict=True):
    im = idx.image_ids[r]
    if im in wanted:
      boxes.setdefault((im, idx.classes[k]), []).append(tuple(float(v) for v in xywh))
      order.append(im)
  return maps, boxes, None, order


def score(
  maps: MapSet,
  boxes: dict | None = None,
  n_boot: int = chexlocalize.N_REPLICATES,
  seed: int = 0,
  masks: dict | None = None,
  protocols: Sequence[str] = ("chexlocalize",),
  box_order: Sequence[str] | None = None,
):
  """The protocols' results {protocol: {class: entry}} plus 'settings' (and 'per_image' with
  chexlocalize): `PROTOCOLS` names the families. chexlocalize: `chexlocalize.split_results`
  (all_images) of every image for every class with a box (`read_boxes`) or a mask
  (`read_masks`; a class's images without one have none). detection, wsrpn: `detections`
  (boxes only; box_order: one image id per box in the box file's order, for WSRPN's split)."""
  unknown = sorted(set(protocols) - set(PROTOCOLS))
  if unknown:
    raise ValueError(f"unknown protocols {unknown}; expected some of {PROTOCOLS}")
  if masks is not None:
    classes = [k for k in maps.classes if any(m.any() for (_, c), m in masks.items() if c == k)]
  else:
    classes = [k for k in maps.classes if any(cls == k for _, cls in boxes or {})]
  result: dict = {}
  notes = []
  if "chexlocalize" in protocols:
    result.update(_chexlocalize(maps, classes, boxes, masks, n_boot, seed))
  for family in ("detection", "wsrpn"):
    if family not in protocols:
      continue
    if masks is not None:
      notes.append(f"{family}: not scored against masks (it needs boxes)")
      continue
    got, note = detections(maps, classes, boxes or {}, family, n_boot, seed, box_order)
    result.update(got)
    notes.extend(note)
  result["settings"] = {
    "n_boot": int(n_boot),
    "seed": int(seed),
    "n_images": len(maps.image_ids),
    "classes": classes,
    "protocols": list(protocols),
    "tuning": "the tuning half: first byte of sha256(str(patient id)) even",
    "notes": notes,
  }
  return result


def _chexlocalize(maps, classes, boxes, masks, n_boot, seed) -> dict:
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
  return chexlocalize.split_results(cases, n_boot, seed, all_images=True)


# ----------------------------------------------------------------------------------------------
# Detection protocols


def predicted_boxes(maps: MapSet, classes, rows, family: str) -> list[np.ndarray]:
  """Per image of rows, (M, 6) x, y, w, h, class index (into classes), score: `BOX_RULES`
  of the family; a class with a probability not above PRESENT has no box."""
  taus, top1 = BOX_RULES[family]
  out = []
  for i in rows:
    found = []
    for k, cls in enumerate(classes):
      j = maps.classes.index(cls)
      prob = 1.0 if maps.probs is None else float(maps.probs[i, j])
      if not prob > PRESENT and maps.probs is not None:
        continue
      s = chexlocalize.check_finite(maps.maps[i][j], f"image {maps.image_ids[i]}, class {cls}")
      b = np.concatenate([detection.map_boxes(s, t, maps.image_sizes[i]) for t in taus])
      if top1 and len(b):
        b = b[[int(np.argmax(b[:, 5]))]]  # WSRPN keeps the most confident (mean-pooled) box
      found.append(np.column_stack([b[:, :4], np.full(len(b), k), b[:, 4] * prob]))
    out.append(np.concatenate(found) if found else np.zeros((0, 6)))
  return out


def truth_boxes(maps: MapSet, classes, rows, boxes) -> list[np.ndarray]:
  """Per image of rows, (T, 5) x, y, w, h, class index of its boxes."""
  return [
    np.array(
      [(*b, k) for k, c in enumerate(classes) for b in boxes.get((maps.image_ids[i], c), ())],
      np.float64,
    ).reshape(-1, 5)
    for i in rows
  ]


def image_draws(n: int, n_boot: int, seed: int) -> np.ndarray | None:
  """(n_boot, n) image multiplicities of eval.py-style replicates (np.random.seed(seed),
  np.random.choice(n, n) each); None without replicates."""
  if n_boot <= 0 or n == 0:
    return None
  rng = np.random.RandomState(seed)
  return np.stack([np.bincount(rng.choice(n, n, replace=True), minlength=n) for _ in range(n_boot)])


def _entry(point, reps, n) -> dict:
  """value = the replicates' mean and their 2.5 / 97.5 % quantiles (WSRPN's
  DetectionMetricsWithBootstrap), point = the full set's value."""
  point = float(point)
  if reps is None or np.all(np.isnan(reps)):
    return {"value": point, "lo": math.nan, "hi": math.nan, "point": point, "n": int(n)}
  ok = np.asarray(reps, np.float64)[~np.isnan(reps)]
  lo, hi = np.quantile(ok, [0.025, 0.975])
  return {"value": float(ok.mean()), "lo": float(lo), "hi": float(hi), "point": point, "n": int(n)}


def _by_class(classes, n, point, reps, overall=None, overall_reps=None) -> dict:
  """{class: entry, ALL: entry} of per-class values (C,) and replicates (R, C); ALL is
  `overall` (with its replicates) or else the class mean."""
  out = {
    c: _entry(point[k], None if reps is None else reps[:, k], n) for k, c in enumerate(classes)
  }
  if overall is None:
    overall = _nanmean_rows(np.asarray(point, np.float64)[None])[0]
    overall_reps = None if reps is None else _nanmean_rows(reps)
  out[ALL] = _entry(overall, overall_reps, n)
  return out


def detections(maps, classes, boxes, family, n_boot, seed, box_order=None):
  """({protocol: {class: entry}}, notes) of one detection family (module docstring)."""
  rows = sorted(range(len(maps.image_ids)), key=lambda i: maps.image_ids[i])
  notes = []
  if family == "wsrpn":
    patient = dict(zip(maps.image_ids, maps.patient_ids, strict=True))
    order = box_order or [im for (im, _), bs in boxes.items() for _ in bs]
    valid, test = detection.wsrpn_split(order, patient.get)
    rows = [i for i in rows if maps.image_ids[i] in test]
    notes.append(f"wsrpn: {len(valid)} validation and {len(test)} test box images, "
                 f"{len(rows)} test images scored")  # fmt: skip
  preds = predicted_boxes(maps, classes, rows, family)
  truth = truth_boxes(maps, classes, rows, boxes)
  counts = image_draws(len(rows), n_boot, seed)
  n, c = len(rows), len(classes)
  out: dict = {}
  for thr in IOUS:
    reps = None if counts is None else detection.coco_ap(preds, truth, c, thr, counts)
    out[f"{family}_ap@{thr:g}"] = _by_class(
      classes, n, detection.coco_ap(preds, truth, c, thr), reps
    )
  lc = detection.loc_acc_counts(preds, truth, c, IOUS)
  point = detection.loc_acc(*lc)
  reps = None if counts is None else detection.loc_acc(*lc, counts=counts)
  for t, thr in enumerate(IOUS):
    r = None if reps is None else reps[:, :, t]
    out[f"{family}_loc_acc@{thr:g}"] = _by_class(classes, n, point[:, t], r)
  if c < 2:
    notes.append(f"{family}: RoDeO needs two classes or more (rodeo.RoDeO asserts it); not scored")
    return out, notes
  point = detection.rodeo(preds, truth, c)
  reps = None if counts is None else detection.rodeo(preds, truth, c, counts)
  for comp in ("total", "localization", "shape", "classification"):
    by = "by_class_" + comp
    out[f"{family}_rodeo_{comp}"] = _by_class(
      classes, n, point[by], None if reps is None else reps[by],
      point[comp], None if reps is None else reps[comp],
    )  # fmt: skip
  return out, notes


def _nanmean_rows(a) -> np.ndarray:
  """Row means skipping NaN (NaN for an all-NaN row, without a warning)."""
  a = np.asarray(a, np.float64)
  ok = ~np.isnan(a)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(ok.any(1), np.where(ok, a, 0).sum(1) / ok.sum(1), np.nan)


def protocol_names(result: dict) -> list[str]:
  """The protocols of a `score` result (its keys but 'settings' and 'per_image')."""
  return [k for k in result if k not in ("settings", "per_image")]


def write_outputs(result: dict, out_dir, per_image: bool = False) -> list:
  """scores.csv, scores.json, scores.md, scores.html and (per_image, with the chexlocalize
  protocols) per_image.csv in out_dir; their paths."""
  out = fileio.as_path(out_dir)
  protocols = {k: result[k] for k in protocol_names(result)}
  rows = [
    [p, c, *(_num(e[key]) for key in ("value", "lo", "hi")), e["n"]]
    for p, by_cls in protocols.items()
    for c, e in by_cls.items()
  ]
  header = ["protocol", "class", "value", "ci_low", "ci_high", "n"]
  paths = [out / "scores.csv", out / "scores.json", out / "scores.md", out / "scores.html"]
  fileio.write_text(paths[0], tables.csv_text(header, rows))
  fileio.write_json(paths[1], {**protocols, "settings": result["settings"]})
  fileio.write_text(paths[2], markdown(protocols))
  html_page.write_report(
    out, title="lsemil score", tables=markdown_tables(protocols), intro=_intro(result["settings"]),
    filename="scores.html",
  )  # fmt: skip
  if per_image and "per_image" in result:
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


def _intro(settings: dict) -> str:
  notes = "".join(f" {n}." for n in settings.get("notes", ()))
  return (
    f"{settings['n_images']} images, classes {', '.join(settings['classes'])}; "
    f"{settings['n_boot']} bootstrap replicates (seed {settings['seed']}); each cell: value "
    f"(95% interval).{notes}"
  )


def markdown_tables(protocols: dict) -> list[tuple[str, str]]:
  """[(family, classes x protocols table)] for the cheXlocalize, detection and WSRPN families."""
  out = []
  for family in PROTOCOLS:
    names = {p: protocols[p] for p in protocols if p.startswith(family + "_")}
    if names:
      out.append((family, markdown(names)))
  return out


def markdown(protocols: dict) -> str:
  """Classes x protocols, 'value (lo-hi)' to 3 decimals ('-' where undefined); one table per
  family (`markdown_tables`), separated by a blank line."""
  fams = [p.split("_")[0] for p in protocols]
  if len(set(fams)) > 1:
    return "\n\n".join(t for _, t in markdown_tables(protocols))
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
