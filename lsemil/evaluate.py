"""`lsemil evaluate`: AUC, DICE and IoBB accuracy of a checkpoint on a split (Sec 4.2-4.4).

  lsemil evaluate --workdir W [--data-dir D] [--split test] [--out F.json]
  lsemil evaluate --checkpoint W/checkpoints/<step> --data-dir D --out F.json

The split streams through `lsemil.data.pipeline.make_eval_iter` (padded, masked batches) and
the jitted forward of the model; only the class probabilities of every image are kept, plus the
saliency maps of the images with ground-truth boxes (880 of the 25,596 NIH test images), so
memory does not grow with the split. Computed (host-side numpy, `lsemil.metrics`):

- classification (Sec 4.3, Table 3): the AUC of each of the 14 classes, its 95% bootstrap
  interval resampling patients (the NIH split is patient-wise, Sec 4.1), and the mean AUC over
  the defined classes;
- localization (Sec 4.2/4.4, Tables 2 and 3): for each of the 8 box classes, the continuous
  DICE of the class's saliency map against the union of that class's boxes on the image, at
  512 x 512 (nearest upsampling, as the model's own U), beside the DICE of the best uniform map
  on the same boxes; and the IoBB (and IoU) accuracy of Wang et al. 2017: the map binarized at
  tau, connected components boxed, a box found when some predicted box reaches T(IoBB) >= t.
  Every box class over the tau sweep `DEFAULT_TAUS` (0.1 .. 0.9; the paper's Table 2 taus are
  among them) at t = 0.5 (`iobb`, Table 2's layout) and at `DEFAULT_TS` (`localization`).

Outputs (process 0 only): F.json (strict JSON: an undefined value, e.g. the AUC of a class
without positives, is null; `load_evaluation` turns it back into NaN), F.csv (long format: one
metric, class, tau, T per row) and F_saliency_boxes.npz with the kept saliency maps (float16),
the multi-resolution maps and images of the Figure 3 candidates (`figure_cases`). The JSON is a
`lsemil.report.RunResult` plus bookkeeping (step, split, data_dir, counts, images/s).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath
from tqdm import tqdm

from lsemil import metrics
from lsemil.data import nih
from lsemil.data import prepare as prep

DEFAULT_TAUS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)  # T(IoBB) / T(IoU) thresholds
TABLE2_T = 0.5  # the paper's T(IoBB) (Table 2)
EVAL_SIZE = 512  # DICE and IoBB are computed on the 512 x 512 grid (Sec 4.2)
DEFAULT_N_BOOT = 1000
FIGURE_CASES = 6
SALIENCY_SUFFIX = "_saliency_boxes.npz"
# Keys whose leaves are numbers: JSON null there means NaN.
_NUMERIC_KEYS = (
  "auc",
  "auc_lo",
  "auc_hi",
  "mean_auc",
  "dice",
  "dice_uniform",
  "iobb",
  "localization",
)


class EvaluateError(RuntimeError):
  """A checkpoint, dataset or output problem; the message names the path."""


# --------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def as_path(path) -> epath.Path:
  """A local or remote (gs://) path; outputs and workdirs go through etils.epath."""
  return epath.Path(path)


def is_remote(path) -> bool:
  return "://" in str(path)


def norm_dir(path) -> str:
  """A folder's identity for comparisons: the resolved local path or the URL as written."""
  return str(path).rstrip("/") if is_remote(path) else str(Path(path).resolve())


def write_bytes(path, data: bytes) -> None:
  """Writes a file, atomically (temp name + rename) when local; parents are created."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_bytes(data)
    return
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def tau_key(tau: float) -> str:
  """JSON key of a threshold: 0.1 -> '0.1'."""
  return f"{float(tau):g}"


def open_index(config, data_dir) -> nih.NihIndex:
  """The dataset index with the config's validation fraction and split seed (as the pipeline)."""
  data = config.data
  return prep.open_index(
    data_dir,
    val_fraction=float(data.get("val_fraction", 0.25) or 0.25),
    split_seed=int(data.get("split_seed", 0) or 0),
  )


def box_cases(index: nih.NihIndex, rows: Iterable[int]) -> dict[int, list[tuple[int, list]]]:
  """{row: [(box class index, [(x, y, w, h), ...]), ...]} for the given rows that have boxes.

  One case per (image, box class): the union of that class's boxes on the image (Sec 4.2).
  """
  rows = set(int(r) for r in rows)
  out: dict[int, dict[int, list]] = {}
  for r, k, xywh in zip(index.box_rows, index.box_classes, index.box_xywh, strict=True):
    if int(r) in rows:
      out.setdefault(int(r), {}).setdefault(int(k), []).append(tuple(float(v) for v in xywh))
  return {r: sorted(by_cls.items()) for r, by_cls in sorted(out.items())}


def figure_cases(index: nih.NihIndex, split: str, n: int = FIGURE_CASES) -> list[tuple[int, int]]:
  """Up to n (row, box class) pairs for Figure 3, covering as many classes as possible.

  Deterministic (the same images for every run on the same dataset). The first round gives
  each box class of the split one image, rarest class first (so an image is not spent on a
  common class when it is a rare class's only one), the lowest unused row each time; later
  rounds go round-robin in NIH order. Returned in round, then class order.
  """
  split_rows = set(index.rows(split).tolist())
  by_class: dict[int, list[int]] = {}
  for r, k in zip(index.box_rows.tolist(), index.box_classes.tolist(), strict=True):
    if r in split_rows and r not in by_class.setdefault(k, []):
      by_class[k].append(r)
  for rows in by_class.values():
    rows.sort()
  chosen: list[tuple[int, int, int]] = []  # (round, class, row)
  used: set[int] = set()
  order = sorted(by_class, key=lambda k: (len(by_class[k]), k))
  rnd = 0
  while len(chosen) < n:
    progressed = False
    for k in order:
      rows = [r for r in by_class[k] if r not in used]
      if rows and len(chosen) < n:
        chosen.append((rnd, k, rows[0]))
        used.add(rows[0])
        progressed = True
    if not progressed:
      break
    rnd += 1
    order = sorted(by_class)
  return [(r, k) for _, k, r in sorted(chosen)]


# --------------------------------------------------------------------------- localization


def localization_metrics(
  saliency: Mapping[int, np.ndarray],
  cases: Mapping[int, list[tuple[int, list]]],
  box_space: float,
  *,
  taus: Sequence[float] = DEFAULT_TAUS,
  ts: Sequence[float] = DEFAULT_TS,
  progress: bool = False,
) -> dict:
  """DICE, uniform-map DICE and IoBB / IoU accuracy per box class from kept saliency maps.

  saliency: {row: (N, N, K) map}; cases: `box_cases` (rows without a map are skipped).
  Returns {'dice', 'dice_uniform', 'num_cases', 'num_boxes': {class: value},
  'iobb': {class: {tau: accuracy at T(IoBB) = 0.5}},
  'localization': {'iobb' | 'iou': {T: {class: {tau: accuracy}}}}} (keys are strings).
  """
  ts = sorted({float(t) for t in ts} | {TABLE2_T})
  dice_v: dict[int, list[float]] = {}
  unif_v: dict[int, list[float]] = {}
  # hits[kind][k][tau_index] -> list of best IoBB / IoU per ground-truth box
  best: dict[str, dict[int, list[list[np.ndarray]]]] = {"iobb": {}, "iou": {}}
  n_boxes: dict[int, int] = {}
  todo = [(r, k, b) for r, cs in cases.items() if r in saliency for k, b in cs]
  for r, k, boxes in tqdm(todo, desc="localization", disable=not progress, file=sys.stderr):
    s = np.asarray(saliency[r][..., k], dtype=np.float64)
    s512 = metrics.resize_saliency(s, EVAL_SIZE)
    mask = metrics.boxes_to_mask(boxes, EVAL_SIZE, box_space)
    dice_v.setdefault(k, []).append(metrics.dice(s512, mask))
    unif_v.setdefault(k, []).append(metrics.uniform_dice(mask))
    n_boxes[k] = n_boxes.get(k, 0) + len(boxes)
    for kind in best:
      best[kind].setdefault(k, [[] for _ in taus])
    for i, tau in enumerate(taus):
      hits = metrics.localization_hits(s512, boxes, tau, EVAL_SIZE, box_space)
      for kind in best:
        best[kind][k][i].append(hits[kind])
  out: dict[str, Any] = {"dice": {}, "dice_uniform": {}, "num_cases": {}, "num_boxes": {}}
  loc: dict[str, dict] = {kind: {tau_key(t): {} for t in ts} for kind in best}
  for k in sorted(dice_v):
    cls = nih.CLASSES[k]
    out["dice"][cls] = float(np.mean(dice_v[k]))
    out["dice_uniform"][cls] = float(np.mean(unif_v[k]))
    out["num_cases"][cls] = len(dice_v[k])
    out["num_boxes"][cls] = n_boxes[k]
    for kind in best:
      for t in ts:
        loc[kind][tau_key(t)][cls] = {
          tau_key(tau): float(np.mean(np.concatenate(best[kind][k][i]) >= t))
          for i, tau in enumerate(taus)
        }
  out["iobb"] = loc["iobb"][tau_key(TABLE2_T)]
  out["localization"] = loc
  return out


# --------------------------------------------------------------------------- evaluation


def _allgather(x: np.ndarray, count: int) -> np.ndarray:
  """Concatenates each process's equally shaped local array along axis 0 (identity for 1)."""
  if count == 1:
    return x
  from jax.experimental import multihost_utils

  g = np.asarray(multihost_utils.process_allgather(x, tiled=False))
  return g.reshape((-1, *x.shape[1:]))


def evaluate_checkpoint(
  config,
  model,
  variables,
  data_dir,
  split: str = "test",
  *,
  keep_saliency_for: Iterable[int] | None = None,
  n_boot: int = DEFAULT_N_BOOT,
  seed: int = 0,
  taus: Sequence[float] = DEFAULT_TAUS,
  ts: Sequence[float] = DEFAULT_TS,
  n_figure: int = FIGURE_CASES,
  saliency_path: str | os.PathLike | None = None,
  predict_fn=None,
  progress: bool = True,
  step: int | None = None,
  checkpoint: str | None = None,
) -> dict:
  """Evaluates a model on one split of `data_dir`; returns a JSON-able `RunResult`-like dict.

  Args:
    config: the run's config (`config.data` for the split, `config.train.eval_batch_size`).
    model, variables: the flax module and its {'params', 'batch_stats'?} (host arrays).
    keep_saliency_for: rows (in `load_index` order) whose saliency maps are kept and used for
      DICE / IoBB; None = every image of the split with a box. Other maps are dropped batch
      by batch.
    n_boot: bootstrap resamples (over patients) for the AUC intervals; 0 skips them.
    saliency_path: when given (and on process 0), the kept maps, the Figure 3 candidates'
      images and multi-resolution maps are written there as a compressed .npz.
    predict_fn: fn(variables, images) -> dict(probs, saliency, saliency_levels); default
      `make_predict_fn(model)`.
    step, checkpoint: recorded in the result.

  Returns:
    {'r0', 'split', 'step', 'checkpoint', 'data_dir', 'num_images', 'num_patients',
     'auc', 'auc_lo', 'auc_hi', 'mean_auc', 'auc_undefined', 'num_positives',
     'dice', 'dice_uniform', 'num_cases', 'num_boxes', 'iobb', 'localization', 'taus',
     'ts', 'table1', 'images_per_second', 'seconds', 'n_boot', 'saliency_file'?}.
  """
  import jax

  from lsemil.data import pipeline
  from lsemil.data import stats as stats_lib

  index = open_index(config, data_dir)
  split_rows = index.rows(split)
  if keep_saliency_for is None:
    keep = set(np.unique(index.box_rows).tolist()) & set(split_rows.tolist())
  else:
    keep = set(int(r) for r in keep_saliency_for)
  fig = figure_cases(index, split, n_figure)
  fig_rows = [r for r, _ in fig]
  from lsemil import train as train_lib

  predict_fn = predict_fn or train_lib.make_predict_fn(model)
  pcount, pindex = jax.process_count(), jax.process_index()
  batches = pipeline.make_eval_iter(
    config, data_dir, split, process_index=pindex, process_count=pcount
  )
  n_total = len(split_rows)
  probs_all, rows_all = [], []
  kept: dict[int, np.ndarray] = {}
  levels: dict[int, list[np.ndarray]] = {}
  t0 = time.perf_counter()
  t_first = None
  n_after_first = 0
  bar = tqdm(
    total=n_total, desc=f"evaluate {split}", unit="img", disable=not progress, file=sys.stderr
  )
  for batch in batches:
    out = predict_fn(variables, np.asarray(batch["image"]))
    probs = _allgather(np.asarray(out["probs"], np.float32), pcount)
    rows = _allgather(np.asarray(batch["row"], np.int64), pcount)
    mask = _allgather(np.asarray(batch["mask"], bool), pcount)
    want = mask & np.isin(rows, list(keep)) if keep else np.zeros_like(mask)
    if want.any():  # the same decision on every process: rows are gathered
      sal = _allgather(np.asarray(out["saliency"], np.float16), pcount)
      for i in np.flatnonzero(want):
        kept[int(rows[i])] = sal[i]
    fig_here = mask & np.isin(rows, fig_rows)
    if fig_here.any():
      lv = [_allgather(np.asarray(x, np.float16), pcount) for x in out["saliency_levels"]]
      for i in np.flatnonzero(fig_here):
        levels[int(rows[i])] = [x[i] for x in lv]
    probs_all.append(probs[mask])
    rows_all.append(rows[mask])
    n = int(mask.sum())
    bar.update(n)
    if t_first is None:
      t_first = time.perf_counter()  # after the first batch: compilation excluded
    else:
      n_after_first += n
  bar.close()
  t_end = time.perf_counter()
  probs = np.concatenate(probs_all) if probs_all else np.zeros((0, nih.NUM_CLASSES), np.float32)
  rows = np.concatenate(rows_all) if rows_all else np.zeros((0,), np.int64)
  if len(rows) != n_total or len(np.unique(rows)) != n_total:
    raise EvaluateError(
      f"{data_dir}: evaluated {len(rows)} images ({len(np.unique(rows))} distinct) of the "
      f"{n_total} in split {split!r}"
    )
  order = np.argsort(rows)
  rows, probs = rows[order], probs[order]
  seconds = t_end - t0
  steady = t_end - t_first if t_first is not None else 0.0
  ips = n_after_first / steady if n_after_first and steady > 0 else n_total / max(seconds, 1e-9)
  _log(f"evaluated {n_total} images of {split!r} in {seconds:.1f} s ({ips:.1f} images/s)")

  labels = np.asarray(index.labels, np.float64)[rows]
  patients = np.asarray(index.patient_ids)[rows]
  auc = metrics.per_class_auc(labels, probs)
  mean, missing = metrics.mean_auc(auc)
  if n_boot > 0 and n_total:
    lo, hi = metrics.bootstrap_auc_ci(labels, probs, patients, n_boot=n_boot, seed=seed)
  else:
    lo = hi = np.full(nih.NUM_CLASSES, np.nan)
  loc = localization_metrics(
    kept, box_cases(index, kept), index.box_space, taus=taus, ts=ts, progress=progress
  )

  def by_class(v):
    return {c: float(x) for c, x in zip(nih.CLASSES, v, strict=True)}

  result: dict[str, Any] = {
    "r0": float(config.model.get("r0", float("nan"))),
    "split": split,
    "step": None if step is None else int(step),
    "checkpoint": checkpoint,
    "data_dir": norm_dir(data_dir),
    "config_name": str(config.get("name", "")),
    "num_images": int(n_total),
    "num_patients": int(len(np.unique(patients))),
    "num_positives": {c: int(v) for c, v in zip(nih.CLASSES, labels.sum(0), strict=True)},
    "auc": by_class(auc),
    "auc_lo": by_class(lo),
    "auc_hi": by_class(hi),
    "mean_auc": float(mean),
    "auc_undefined": [nih.CLASSES[k] for k in missing],
    **loc,
    "taus": [float(t) for t in taus],
    "ts": sorted({float(t) for t in ts} | {TABLE2_T}),
    "t": TABLE2_T,
    "n_boot": int(n_boot),
    "seed": int(seed),
    "num_saliency_kept": len(kept),
    "figure_cases": [[int(r), nih.CLASSES[k]] for r, k in fig],
    "images_per_second": float(ips),
    "seconds": float(seconds),
    "table1": stats_lib.table1(index),
  }
  if saliency_path is not None and pindex == 0:
    saliency_path = as_path(saliency_path)
    write_saliency(saliency_path, kept, levels, fig, index, config, data_dir, split)
    result["saliency_file"] = saliency_path.name
  return result


def _figure_images(config, data_dir: Path, split: str, rows: Sequence[int]) -> np.ndarray:
  """The stored (e.g. 512 x 512) images of some rows of a split, uint8 (n, H, W)."""
  from lsemil.data import pipeline

  if not rows:
    return np.zeros((0, 1, 1), np.uint8)
  data = config.data
  source = pipeline.open_source(
    data_dir,
    split,
    val_fraction=float(data.get("val_fraction", 0.25) or 0.25),
    split_seed=int(data.get("split_seed", 0) or 0),
  )
  pos = {int(r): i for i, r in enumerate(source.rows)}
  return np.stack([source[pos[int(r)]]["image"] for r in rows])


def write_saliency(path, kept, levels, fig, index, config, data_dir, split) -> None:
  """Writes the kept maps and the Figure 1/3 material as one compressed .npz."""
  rows = np.array(sorted(kept), np.int64)
  some = next(iter(kept.values()), None)
  shape = some.shape if some is not None else (0, 0, nih.NUM_CLASSES)
  arrays: dict[str, np.ndarray] = {
    "rows": rows,
    "image_ids": np.array([index.image_ids[r] for r in rows], dtype=str),
    "saliency": (
      np.stack([kept[r] for r in rows]).astype(np.float16)
      if len(rows)
      else np.zeros((0, *shape), np.float16)
    ),
    "classes": np.array(nih.CLASSES),
    "box_space": np.array(index.box_space),
    "split": np.array(split),
  }
  fig = [(r, k) for r, k in fig if r in levels]
  arrays["fig_rows"] = np.array([r for r, _ in fig], np.int64)
  arrays["fig_classes"] = np.array([k for _, k in fig], np.int64)
  arrays["fig_images"] = _figure_images(config, data_dir, split, [r for r, _ in fig])
  n_levels = len(levels[fig[0][0]]) if fig else 0
  arrays["num_levels"] = np.array(n_levels)
  for lv in range(n_levels):
    arrays[f"levels_{lv}"] = np.stack([levels[r][lv] for r, _ in fig]).astype(np.float16)
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  write_bytes(path, buf.getvalue())


def load_saliency(path: str | os.PathLike) -> dict:
  """The .npz of `write_saliency` as a dict: 'maps' {row: (N, N, K) float32},
  'figure' [(row, class index, image, [level maps (n_l, n_l, K)])], 'box_space', 'split'."""
  path = as_path(path)
  try:
    with np.load(io.BytesIO(path.read_bytes())) as z:
      maps = {int(r): z["saliency"][i].astype(np.float32) for i, r in enumerate(z["rows"])}
      n_levels = int(z["num_levels"])
      figure = [
        (
          int(r),
          int(k),
          z["fig_images"][i],
          [z[f"levels_{lv}"][i].astype(np.float32) for lv in range(n_levels)],
        )
        for i, (r, k) in enumerate(zip(z["fig_rows"], z["fig_classes"], strict=True))
      ]
      return {
        "maps": maps,
        "figure": figure,
        "box_space": float(z["box_space"]),
        "split": str(z["split"]),
      }
  except (OSError, KeyError, ValueError) as e:
    raise EvaluateError(f"{path}: not a saliency file of `lsemil evaluate` ({e})") from e


# --------------------------------------------------------------------------- JSON / CSV


def _nan_to_none(obj):
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, Mapping):
    return {str(k): _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [_nan_to_none(v) for v in obj]
  if isinstance(obj, np.generic):
    return _nan_to_none(obj.item())
  return obj


def _none_to_nan(obj):
  if obj is None:
    return float("nan")
  if isinstance(obj, Mapping):
    return {k: _none_to_nan(v) for k, v in obj.items()}
  return obj


def to_json(result: Mapping) -> str:
  """Strict JSON of a result (NaN / inf -> null)."""
  return json.dumps(_nan_to_none(result), indent=1, allow_nan=False) + "\n"


def load_evaluation(path: str | os.PathLike) -> dict:
  """An evaluation JSON, with null metric values turned back into NaN."""
  path = as_path(path)
  try:
    result = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise EvaluateError(f"{path}: cannot read an evaluation JSON ({e})") from e
  if not isinstance(result, dict):
    raise EvaluateError(f"{path}: not a JSON object")
  for key in _NUMERIC_KEYS:
    if key in result:
      result[key] = _none_to_nan(result[key])
  return result


def to_csv(result: Mapping) -> str:
  """Long-format CSV: metric, class, tau, T, value, lo, hi (empty where not applicable)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["metric", "class", "tau", "T", "value", "lo", "hi"])

  def num(v):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))

  lo, hi = result.get("auc_lo", {}), result.get("auc_hi", {})
  for c, v in result.get("auc", {}).items():
    w.writerow(["auc", c, "", "", num(v), num(lo.get(c)), num(hi.get(c))])
  w.writerow(["mean_auc", "", "", "", num(result.get("mean_auc")), "", ""])
  for key in ("dice", "dice_uniform"):
    for c, v in result.get(key, {}).items():
      w.writerow([key, c, "", "", num(v), "", ""])
  for kind, by_t in result.get("localization", {}).items():
    for t, by_cls in by_t.items():
      for c, by_tau in by_cls.items():
        for tau, v in by_tau.items():
          w.writerow([f"{kind}_accuracy", c, tau, t, num(v), "", ""])
  return buf.getvalue()


def saliency_path_for(out) -> epath.Path:
  out = as_path(out)
  return out.with_name(out.stem + SALIENCY_SUFFIX)


def write_evaluation(result: Mapping, out) -> tuple[epath.Path, epath.Path]:
  """Writes F.json and F.csv (atomically when local); returns their paths."""
  out = as_path(out)
  csv_path = out.with_suffix(".csv")
  write_bytes(out, to_json(result).encode())
  write_bytes(csv_path, to_csv(result).encode())
  return out, csv_path


# --------------------------------------------------------------------------- workdirs


def workdir_of(path) -> epath.Path:
  """The training workdir of a workdir, its checkpoints/ folder or a step folder."""
  p = as_path(path)
  if p.name.isdigit() and p.parent.name == "checkpoints":
    return p.parent.parent
  if p.name == "checkpoints":
    return p.parent
  return p


def default_output(workdir, split: str = "test") -> epath.Path:
  """W/evaluation_<split>.json: where `evaluate --workdir W` writes and `reproduce` looks."""
  return as_path(workdir) / f"evaluation_{split}.json"


def resolve_data_dir(config, data_dir) -> str:
  """--data-dir, else the run's `config.data.data_dir`; raises naming what is missing."""
  chosen = data_dir or (config.data.get("data_dir") if "data" in config else None)
  if not chosen:
    raise EvaluateError("no --data-dir given and the run's config records no data.data_dir")
  if not as_path(chosen).is_dir():
    raise EvaluateError(f"{chosen}: dataset folder not found")
  return str(chosen)


def load_checkpoint(path, which: str = "best"):
  """`lsemil.checkpointing.load_inference`, with errors naming the path."""
  from lsemil import checkpointing

  try:
    return checkpointing.load_inference(path, which=which)
  except FileNotFoundError as e:
    raise EvaluateError(str(e)) from e


def matches(result: Mapping, *, step: int, split: str, data_dir) -> bool:
  """Whether a stored evaluation is of this checkpoint step, split and dataset."""
  try:
    same_dir = norm_dir(result.get("data_dir", "")) == norm_dir(data_dir)
  except OSError:
    same_dir = False
  return (
    result.get("step") is not None
    and int(result["step"]) == int(step)
    and result.get("split") == split
    and same_dir
  )


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil evaluate",
    description="Per-class AUC (95 percent patient-bootstrap CI), DICE of the 8 box classes "
    "(with the uniform-map baseline) and IoBB accuracy (Yao et al. 2018, Sec 4.2-4.4) of a "
    "checkpoint on one split. Writes F.json, F.csv and F"
    + SALIENCY_SUFFIX
    + " (saliency maps of the "
    "images with boxes).",
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training workdir (its best checkpoint, see --which)")
  src.add_argument(
    "--checkpoint", help="a workdir, its checkpoints/ folder or one step folder W/checkpoints/N"
  )
  p.add_argument(
    "--which",
    choices=("best", "latest"),
    default="best",
    help="checkpoint of a workdir: best validation mean AUC or latest (default best)",
  )
  p.add_argument("--data-dir", help="dataset folder (default: data.data_dir of the run's config)")
  p.add_argument("--split", choices=nih.SPLITS, default="test", help="default test")
  p.add_argument("--out", help="output JSON (default: <workdir>/evaluation_<split>.json)")
  p.add_argument(
    "--n-boot",
    type=int,
    default=DEFAULT_N_BOOT,
    help=f"bootstrap resamples of patients for AUC CIs (default {DEFAULT_N_BOOT}; 0 = none)",
  )
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
  p.add_argument(
    "--taus",
    default=",".join(tau_key(t) for t in DEFAULT_TAUS),
    help="binarization thresholds tau for IoBB (default 0.1,...,0.9)",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=0,
    help="eval batch size (default: the config's train.eval_batch_size)",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def _floats(text: str, what: str) -> list[float]:
  try:
    vals = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise EvaluateError(f"{what}: expected comma-separated numbers, got {text!r}") from None
  if not vals or any(not 0 < v < 1 for v in vals):
    raise EvaluateError(f"{what}: values must lie in (0, 1), got {text!r}")
  return vals


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  from lsemil import sharding

  sharding.maybe_initialize_distributed()
  try:
    taus = _floats(args.taus, "--taus")
    path = args.workdir or args.checkpoint
    config, model, variables, step, info = load_checkpoint(path, args.which)
    data_dir = resolve_data_dir(config, args.data_dir)
    if args.batch_size:
      config.train.eval_batch_size = int(args.batch_size)
    out = as_path(args.out) if args.out else default_output(workdir_of(path), args.split)
    _log(f"checkpoint {info.get('checkpoint', path)} (step {step}); data {data_dir}")
    result = evaluate_checkpoint(
      config,
      model,
      variables,
      data_dir,
      args.split,
      n_boot=args.n_boot,
      seed=args.seed,
      taus=taus,
      saliency_path=saliency_path_for(out),
      progress=not args.no_progress,
      step=step,
      checkpoint=str(info.get("checkpoint", path)),
    )
    result["which"] = args.which
  except (EvaluateError, nih.DataError, OSError, ValueError) as e:
    print(f"lsemil evaluate: {e}", file=sys.stderr)
    return 1
  import jax

  if jax.process_index() == 0:
    json_path, csv_path = write_evaluation(result, out)
    undefined = (
      f" ({len(result['auc_undefined'])} classes undefined)" if result["auc_undefined"] else ""
    )
    print(f"mean AUC {result['mean_auc']:.4f}{undefined} over {result['num_images']} images")
    for c, v in result["dice"].items():
      print(f"  DICE {c:<14} {v:.3f}  (uniform {result['dice_uniform'][c]:.3f})")
    print(f"wrote {json_path}, {csv_path} and {saliency_path_for(out)}")
  return 0
