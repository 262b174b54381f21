"""Evaluation of a checkpoint on a split: AUC, DICE and IoBB accuracy (Sec 4.2-4.4).

The split streams through the one inference path (`lsemil.inference.engine.predict_split`: padded,
masked batches on the device mesh); the class probabilities of every image are kept, plus the
saliency maps of the images with ground-truth boxes (880 of the 25,596 NIH test images), so
memory does not grow with the split. Computed (host-side numpy, `lsemil.metrics.overlap`):

- classification (Sec 4.3, Table 3): the AUC of each of the run's classes (its checkpoint's
  config names them, `lsemil.data.findings.of_config`; NIH's 14 for the paper), each over the
  images where its label is known (not NaN), its 95% bootstrap interval resampling patients
  (the NIH split is patient-wise, Sec 4.1), and the mean AUC over the defined classes. On
  another source's data (`EvalOptions.source`, `lsemil evaluate --source S`), the classes the
  synonym table pairs (`lsemil.data.synonyms`), the result's `mapping` naming the pairs and
  the classes left out on each side;
- localization (Sec 4.2/4.4, Tables 2 and 3): for each class with boxes in the data (NIH:
  8), the continuous DICE of the class's saliency map against the union of that class's
  boxes on the image, at 512 x 512 (nearest upsampling, as the model's own U), beside the
  DICE of the best uniform map on the same boxes; and the IoBB (and IoU) accuracy of Wang et
  al. 2017: the map binarized at tau, connected components boxed, a box found when some
  predicted box reaches T(IoBB) >= t. Every box class over the tau sweep `DEFAULT_TAUS` (0.1
  .. 0.9; the paper's Table 2 taus are among them) at t = 0.5 (`iobb`, Table 2's layout) and
  at `DEFAULT_TS` (`localization`);
- the field's weak-localization protocols (`protocols`: `lsemil.metrics.localization.score_all`
  over the same box cases with the run's probabilities: DICE beside the constant map, Wang et
  al. accuracy and AFP, cheXlocalize mIoU, pointing games, pixel AUPRC, with patient-bootstrap
  intervals; Table 4 is built from it);
- calibration (`calibration`: `lsemil.metrics.calibration.calibration_metrics`, ECE over 15
  equal-mass bins and Brier, per class and overall). With `EvalOptions.calibrate`
  ('temperature' | 'platt') the run's VALID split goes through the same predictor, the map is
  fitted there (`calibration.fit`) and the split is scored again with the fitted probabilities
  (`calibration_fitted`); the parameters are written as F_calibration.json
  (`lsemil predict --calibration` applies them).
- operating points (`operating_points`, `lsemil.metrics.operating_points`): on the valid
  split, one decision threshold per class (p >= t) chosen by `EvalOptions.operating_point`
  (Youden's J by default, f1, sens=X, spec=X) with its sensitivity, specificity and PPV
  there; on another split, those of the same step's valid evaluation
  (`stored_operating_points`, passed as `EvalOptions.thresholds`) scored on it. `lsemil
  export` writes the valid split's as thresholds.json.

The saliency source (`lsemil.models.registry`) is the predictor's: 'model' for the MIL model,
'gradcam' or 'cam' for the GAP baseline (min-max scaled per image and class,
`lsemil.models.posthoc`); a GAP run's result has no r0 (it is labelled by its config name).

Outputs (`write_outputs`, process 0 only): F.json (an `Evaluation`, strict JSON: an undefined
value, e.g. the AUC of a class without positives, is null; `load_evaluation` turns it back into
NaN), F.csv (long format: one metric, class, tau, T per row), F_predictions.csv (per image:
image_id, patient_id, the run's class probabilities, `lsemil.inference.engine.predictions_csv`),
F_saliency_boxes.npz with the kept saliency maps (float16), the multi-resolution maps and images
of the Figure 3 candidates (`figure_cases`), and with a recalibration F_calibration.json. The
command is `lsemil.commands.evaluate`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from lsemil.core import fileio, log
from lsemil.core.errors import ConfigError, DataError, OutputError
from lsemil.data import findings, nih, pipeline, synonyms
from lsemil.inference import engine

# Where a workdir keeps its evaluations, and what they store for predict (moved down for
# `lsemil.load`); the names stay importable from here.
from lsemil.inference.records import default_output as default_output
from lsemil.inference.records import stored_calibration as stored_calibration
from lsemil.inference.records import stored_operating_points as stored_operating_points
from lsemil.inference.records import workdir_of as workdir_of
from lsemil.metrics import calibration, classification, localization, operating_points, overlap
from lsemil.models import registry

DEFAULT_TAUS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_TS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75)  # T(IoBB) / T(IoU) thresholds
TABLE2_T = 0.5  # the paper's T(IoBB) (Table 2)
EVAL_SIZE = 512  # DICE and IoBB are computed on the 512 x 512 grid (Sec 4.2)
DEFAULT_N_BOOT = 1000
FIGURE_CASES = 6
SALIENCY_SUFFIX = "_saliency_boxes.npz"
PREDICTIONS_SUFFIX = "_predictions.csv"
CALIBRATION_SUFFIX = "_calibration.json"
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
  "protocols",
  "calibration",
  "calibration_fitted",
)


# --------------------------------------------------------------------------- helpers


def tau_key(tau: float) -> str:
  """JSON key of a threshold: 0.1 -> '0.1'."""
  return f"{float(tau):g}"


def open_index(config, data_dir):
  """The dataset index of the config's source (`data.source`, NIH for a run from before it)
  with its validation fraction, split seed and label policies, as the pipeline reads it: an
  `NihIndex` for NIH (as always), else the source's `SourceIndex` (`pipeline.open_index`)."""
  options = pipeline.options_of(config)
  if options["source"] == "nih":
    return nih.open_index(
      data_dir, val_fraction=options["val_fraction"], split_seed=options["split_seed"]
    )
  return pipeline.open_index(data_dir, **options)


def box_space_of(index) -> float | None:
  """The side of the square image the index's box pixels refer to (NIH: `box_space`; another
  source: its square `image_size`), None when the source has no single square size."""
  if getattr(index, "box_space", None):
    return float(index.box_space)
  size = getattr(index, "image_size", None)
  return float(size[0]) if size and size[0] == size[1] else None


def box_cases(index, rows: Iterable[int]) -> dict[int, list[tuple[int, list]]]:
  """{row: [(box class index, [(x, y, w, h), ...]), ...]} for the given rows that have boxes.

  One case per (image, box class): the union of that class's boxes on the image (Sec 4.2).
  """
  rows = set(int(r) for r in rows)
  out: dict[int, dict[int, list]] = {}
  for r, k, xywh in zip(index.box_rows, index.box_classes, index.box_xywh, strict=True):
    if int(r) in rows:
      out.setdefault(int(r), {}).setdefault(int(k), []).append(tuple(float(v) for v in xywh))
  return {r: sorted(by_cls.items()) for r, by_cls in sorted(out.items())}


def figure_cases(index, split: str, n: int = FIGURE_CASES) -> list[tuple[int, int]]:
  """Up to n (row, box class) pairs for Figure 3, covering as many classes as possible.

  Deterministic (the same images for every run on the same dataset). The first round gives
  each box class of the split one image, rarest class first (so an image is not spent on a
  common class when it is a rare class's only one), the lowest unused row each time; later
  rounds go round-robin in class order. Returned in round, then class order.
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
  classes: Sequence[str],
  taus: Sequence[float] = DEFAULT_TAUS,
  ts: Sequence[float] = DEFAULT_TS,
  progress: log.Progress | None = None,
) -> dict:
  """DICE, uniform-map DICE and IoBB / IoU accuracy per box class from kept saliency maps.

  saliency: {row: (N, N, K) map}; cases: `box_cases` (rows without a map are skipped);
  classes: the K names of the maps' channels (the run's, `findings.of_config`).
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
  for r, k, boxes in log.tracked(todo, progress, "localization"):
    s = np.asarray(saliency[r][..., k], dtype=np.float64)
    s512 = overlap.resize_saliency(s, EVAL_SIZE)
    mask = overlap.boxes_to_mask(boxes, EVAL_SIZE, box_space)
    dice_v.setdefault(k, []).append(overlap.dice(s512, mask))
    unif_v.setdefault(k, []).append(overlap.uniform_dice(mask))
    n_boxes[k] = n_boxes.get(k, 0) + len(boxes)
    for kind in best:
      best[kind].setdefault(k, [[] for _ in taus])
    gt = localization.gt_ranges(boxes, EVAL_SIZE, box_space)
    for i, tau in enumerate(taus):
      # = overlap.localization_hits(s512, ...), the components found on the small map
      pred = localization.grid_boxes(s, tau, EVAL_SIZE, "nearest", s512)
      ov = localization.box_overlaps(pred, gt) if len(pred) else None
      for kind in best:
        hit = ov[kind].max(axis=1) if ov is not None else np.zeros(len(boxes))
        best[kind][k][i].append(hit)
  out: dict[str, Any] = {"dice": {}, "dice_uniform": {}, "num_cases": {}, "num_boxes": {}}
  loc: dict[str, dict] = {kind: {tau_key(t): {} for t in ts} for kind in best}
  for k in sorted(dice_v):
    cls = classes[k]
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


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How a split is scored (the `lsemil evaluate` flags)."""

  n_boot: int = DEFAULT_N_BOOT  # patient-bootstrap resamples for the AUC intervals; 0 = none
  seed: int = 0  # bootstrap seed
  taus: tuple[float, ...] = DEFAULT_TAUS  # binarization thresholds of the IoBB protocol
  ts: tuple[float, ...] = DEFAULT_TS  # T(IoBB) / T(IoU) thresholds
  n_figure: int = FIGURE_CASES  # Figure 1/3 candidates whose per-level maps are kept
  keep_saliency_for: tuple[int, ...] | None = None  # rows; None = the split's box images
  progress: log.Progress | None = None  # a command's bars (`lsemil.commands.progress`)
  # Saliency source ('model' | 'gradcam' | 'cam') and Grad-CAM level; None = the run's config
  # (`registry.saliency_settings`). Used by `evaluate_checkpoint`.
  saliency: str | None = None
  gradcam_level: int | None = None
  protocols: bool = True  # the weak-localization protocols (`localization.score_all`)
  protocol_ts: tuple[float, ...] = localization.DEFAULT_TS  # their T(IoBB) / T(IoU)
  prob_cutoffs: tuple[float, ...] | None = localization.PROB_CUTOFFS  # None: no cutoff variant
  calibrate: str | None = None  # 'temperature' | 'platt': fitted on the valid split
  # Per-class thresholds: chosen by this rule on the valid split (`operating_points.choose`);
  # on another split, `thresholds` (a valid evaluation's operating_points) are scored.
  operating_point: str = operating_points.DEFAULT_RULE
  thresholds: dict | None = None
  # The data's source (`lsemil.data.sources`); None = the run's own (`config.data.source`).
  # Another source is scored on the classes `synonyms.resolve` pairs (`scoring_of`).
  source: str | None = None


@dataclasses.dataclass
class Evaluation:
  """The scores of one checkpoint on one split (JSON: `to_dict`, a `report.RunResult`)."""

  split: str
  step: int | None
  checkpoint: str | None
  data_dir: str
  config_name: str
  r0: float | None  # None (left out of the JSON) for a GAP run
  num_images: int
  num_patients: int
  num_positives: dict
  auc: dict
  auc_lo: dict
  auc_hi: dict
  mean_auc: float
  auc_undefined: list
  dice: dict
  dice_uniform: dict
  num_cases: dict
  num_boxes: dict
  iobb: dict
  localization: dict
  taus: list
  ts: list
  t: float
  n_boot: int
  seed: int
  num_saliency_kept: int
  figure_cases: list
  images_per_second: float  # after the first batch (its compile excluded)
  seconds: float  # the whole split, first batch included
  table1: dict
  which: str | None = None
  saliency_file: str | None = None
  predictions_file: str | None = None
  arch: str = registry.MIL
  saliency_source: str = "model"
  gradcam_level: int | None = None
  protocols: dict | None = None
  calibration: dict | None = None
  calibration_fitted: dict | None = None
  calibration_file: str | None = None
  operating_points: dict | None = None  # `operating_point_results`
  num_known: dict | None = None  # images with a known label per class, where some are unknown
  mapping: dict | None = None  # another source's data: `Scoring.mapping`

  def to_dict(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "step"}


@dataclasses.dataclass
class EvalRun:
  """An `Evaluation` with what it was computed from (written by `write_outputs`)."""

  result: Evaluation
  predictions: engine.SplitPredictions
  index: Any  # the data's `NihIndex` or `SourceIndex` (`open_index`)
  figure: list[tuple[int, int]]  # (row, box class) of the Figure 1/3 candidates
  calibration_params: dict | None = None  # `calibration.fit` of the valid split
  classes: tuple[str, ...] = ()  # the run's classes: the probability columns
  data_config: Any = None  # the config that read the data (`data_config_of`); None: the run's


def _predict(predictor, config, data_dir, split, keep, fig_rows, progress):
  """The split's predictions through the one inference path, reported to `progress`, and the
  steady-state images/s (the first batch, which compiles, excluded)."""
  split_rows = pipeline.split_rows(config, data_dir, split)
  batches = engine.predict_split(
    predictor, config, data_dir, split, saliency_rows=keep, level_rows=fig_rows
  )
  stage, total, done = f"evaluate {split}", len(split_rows), 0
  if progress:
    progress(stage, 0, total)
  t0 = time.perf_counter()
  timing = {"first": None, "after_first": 0}

  def counted():
    nonlocal done
    for b in batches:
      done += len(b.rows)
      if progress:
        progress(stage, done, total)
      if timing["first"] is None:
        timing["first"] = time.perf_counter()
      else:
        timing["after_first"] += len(b.rows)
      yield b

  preds = engine.collect(counted(), split_rows, f"{data_dir} split {split!r}")
  t_end = time.perf_counter()
  seconds = t_end - t0
  steady = t_end - timing["first"] if timing["first"] is not None else 0.0
  n = len(preds.rows)
  ips = (
    timing["after_first"] / steady
    if timing["after_first"] and steady > 0
    else n / max(seconds, 1e-9)
  )
  return preds, seconds, ips


def check_finite(index, preds, classes: Sequence[str]) -> None:
  """A NaN or infinite probability or kept saliency value is a DataError naming the image
  and the class (of the run's `classes`), else a NaN probability would make its class's AUC
  silently undefined."""
  bad = ~np.isfinite(np.asarray(preds.probs, np.float64))
  if bad.any():
    i, k = (int(v) for v in np.argwhere(bad)[0])
    raise DataError(
      f"image {index.image_ids[int(preds.rows[i])]}: the probability of {classes[k]} is "
      f"{preds.probs[i, k]} ({int(bad.any(1).sum())} image(s) with a non-finite probability)"
    )
  for r, m in preds.saliency.items():
    if not np.all(np.isfinite(m)):
      raise DataError(f"image {index.image_ids[int(r)]}: its saliency map has non-finite values")


@dataclasses.dataclass(frozen=True)
class Scoring:
  """Which probability column is scored against which label column, under which name.

  On the run's own source every class against itself (`names` = the run's classes). On
  another source's data the pairs of `synonyms.resolve`, each named by its model class (by
  'model class / data class' where one model class meets two data classes); `mapping` then
  records the two sources, the pairs with their synonym-table rows and the names left out
  on each side, and goes into the result's JSON."""

  names: tuple[str, ...]
  model_cols: tuple[int, ...]
  data_cols: tuple[int, ...]
  mapping: dict | None = None


def scoring_of(config, data_config, data_classes: Sequence[str]) -> Scoring:
  """The `Scoring` of a run (`config`) on the data `data_config` reads (`data_classes`).

  Raises:
    ConfigError: the run's own source whose data classes are not the run's; DataError: no
      class of the run has a counterpart in the other source.
  """
  classes = findings.of_config(config)
  own = pipeline.options_of(config)["source"]
  other = pipeline.options_of(data_config)["source"]
  if own == other:
    if tuple(data_classes) != tuple(classes):
      raise ConfigError(f"the run's classes ({', '.join(classes)}) are not its {own} data's "
                        f"({', '.join(data_classes)})")
    k = tuple(range(len(classes)))
    return Scoring(tuple(classes), k, k)
  res = synonyms.resolve(classes, own, data_classes, other)
  if not res.pairs:
    raise DataError(f"no class of the {own} run ({', '.join(classes)}) has a counterpart among "
                    f"the {other} classes ({', '.join(data_classes)}) in lsemil.data.synonyms")
  twice = {p.model for p in res.pairs if [q.model for q in res.pairs].count(p.model) > 1}
  names = tuple(f"{p.model} / {p.data}" if p.model in twice else p.model for p in res.pairs)
  mapping = {"model_source": own, "source": other, **res.to_dict()}
  for name, pair in zip(names, mapping["pairs"], strict=True):
    pair["scored_as"] = name
  return Scoring(
    names,
    tuple(classes.index(p.model) for p in res.pairs),
    tuple(list(data_classes).index(p.data) for p in res.pairs),
    mapping,
  )


def known_aucs(labels, probs, patients, n_boot: int, seed: int):
  """(AUC, lo, hi) per column over the images where its label is known (not NaN).

  The columns known on every image are scored together, exactly as a matrix without NaN
  always was (one bootstrap over their images); each other column on its own images."""
  k = labels.shape[1]
  auc, lo, hi = (np.full(k, np.nan) for _ in range(3))
  known = ~np.isnan(labels)
  full = np.flatnonzero(known.all(0))
  for cols in ([full] if len(full) else []) + [[j] for j in np.flatnonzero(~known.all(0))]:
    rows = known[:, cols].all(1)
    y, s = labels[rows][:, cols], probs[rows][:, cols]
    auc[cols] = classification.per_class_auc(y, s)
    if n_boot > 0 and len(y):
      lo[cols], hi[cols] = classification.bootstrap_auc_ci(
        y, s, patients[rows], n_boot=n_boot, seed=seed
      )
  return auc, lo, hi


def scored_arrays(index, preds, scoring: Scoring) -> tuple[np.ndarray, np.ndarray]:
  """(labels, probabilities) float64 (n, len(scoring.names)) of the predicted rows."""
  labels = np.asarray(index.labels, np.float64)[preds.rows][:, list(scoring.data_cols)]
  probs = preds.probs.astype(np.float64)[:, list(scoring.model_cols)]
  return labels, probs


def classification_metrics(index, preds, n_boot: int, seed: int, scoring: Scoring) -> dict:
  """Per-class AUC with 95% patient-bootstrap intervals and the mean AUC (Sec 4.3), each
  class over the images where its label is known."""
  labels, probs = scored_arrays(index, preds, scoring)
  patients = np.asarray(index.patient_ids)[preds.rows]
  auc, lo, hi = known_aucs(labels, probs, patients, n_boot, seed)
  mean, missing = classification.mean_auc(auc)

  def by_class(v):
    return {c: float(x) for c, x in zip(scoring.names, v, strict=True)}

  known = (~np.isnan(labels)).sum(0)
  return {
    "num_patients": int(len(np.unique(patients))),
    "num_positives": {c: int(v) for c, v in zip(scoring.names, (labels > 0).sum(0), strict=True)},
    "num_known": (
      {c: int(v) for c, v in zip(scoring.names, known, strict=True)}
      if (known < len(labels)).any() else None
    ),
    "auc": by_class(auc),
    "auc_lo": by_class(lo),
    "auc_hi": by_class(hi),
    "mean_auc": float(mean),
    "auc_undefined": [scoring.names[k] for k in missing],
  }


def evaluate_split(
  predictor: engine.Predictor,
  config,
  data_dir: str,
  split: str = "test",
  options: EvalOptions = EvalOptions(),
  *,
  step: int | None = None,
  checkpoint: str | None = None,
) -> EvalRun:
  """Scores the model of `predictor` (a run of `config`) on one split of `data_dir` (Sec
  4.2-4.4), a folder of the run's source or of `options.source`.

  Every image's class probabilities are kept; saliency maps only for the images with boxes
  (or `options.keep_saliency_for`), so memory does not grow with the split. On another
  source's data only the classes `scoring_of` pairs are scored (AUC over the images where
  the label is known), localization on the data's boxes of those classes
  (`boxes_as_run_classes`); calibration and operating points are the run's own source's (and
  need every scored label known), so they are left out there.
  """
  from lsemil.data import statistics

  classes = findings.of_config(config)
  data_config = data_config_of(config, options.source)
  index = open_index(data_config, data_dir)
  split_rows = index.rows(split)
  if not len(split_rows):  # else every metric is nan over 0 images, written as a result
    raise DataError(f"the {split} split of {data_dir} is empty: no images to evaluate")
  data_classes = pipeline.open_source(data_dir, split, **pipeline.options_of(data_config)).classes
  scoring = scoring_of(config, data_config, data_classes)
  space = box_space_of(index)
  boxed = boxes_as_run_classes(index, scoring) if scoring.mapping else index
  if space is None:
    keep: set[int] = set()
  elif options.keep_saliency_for is None:
    keep = set(np.unique(boxed.box_rows).tolist()) & set(split_rows.tolist())
  else:
    keep = set(int(r) for r in options.keep_saliency_for)
  fig = figure_cases(boxed, split, options.n_figure) if space is not None else []
  preds, seconds, ips = _predict(
    predictor, data_config, data_dir, split, keep, [r for r, _ in fig], options.progress
  )
  log.info(
    f"evaluated {len(preds.rows)} images of {split!r} in {seconds:.1f} s: "
    f"{len(preds.rows) / max(seconds, 1e-9):.1f} images/s end to end (decoding, compiling "
    f"and the forward passes), {ips:.1f} images/s after the first batch"
  )
  check_finite(index, preds, classes)
  loc, protocols = localization_results(boxed, preds, options, classes, space)
  if scoring.mapping or np.isnan(scored_arrays(index, preds, scoring)[0]).any():
    log.info("calibration and operating points left out: they need the run's own source "
             "with every label known")
    cal = fitted = params = ops = None
  else:
    cal, fitted, params = calibration_results(predictor, config, data_dir, preds, options)
    ops = operating_point_results(index, preds, split, options, classes)
  arch = registry.arch_of(predictor.model)
  result = Evaluation(
    split=split,
    step=None if step is None else int(step),
    checkpoint=checkpoint,
    data_dir=fileio.resolve(data_dir),
    config_name=str(config.name),
    r0=float(config.model.r0) if arch == registry.MIL else None,
    num_images=int(len(preds.rows)),
    **classification_metrics(index, preds, options.n_boot, options.seed, scoring),
    **loc,
    taus=[float(t) for t in options.taus],
    ts=sorted({float(t) for t in options.ts} | {TABLE2_T}),
    t=TABLE2_T,
    n_boot=int(options.n_boot),
    seed=int(options.seed),
    num_saliency_kept=len(preds.saliency),
    figure_cases=[[int(r), classes[k]] for r, k in fig],
    images_per_second=float(ips),
    seconds=float(seconds),
    table1=(statistics.table1(index) if isinstance(index, nih.NihIndex)
            else statistics.source_table(index)),
    arch=arch,
    saliency_source=predictor.saliency_source,
    gradcam_level=predictor.gradcam_level,
    protocols=protocols,
    calibration=cal,
    calibration_fitted=fitted,
    operating_points=ops,
    mapping=scoring.mapping,
  )
  return EvalRun(
    result=result, predictions=preds, index=index, figure=fig, calibration_params=params,
    classes=tuple(classes), data_config=data_config,
  )


def boxes_as_run_classes(index, scoring: Scoring):
  """`index` with its boxes in the run's class numbers (`scoring`'s pairs): each box of a
  paired data class once per run class scored against it, none of the others, and none of a
  run class scored against two data classes (whose boxes would mix two findings)."""
  twice = {k for k in scoring.model_cols if scoring.model_cols.count(k) > 1}
  run_of: dict[int, list[int]] = {}
  for k, j in zip(scoring.model_cols, scoring.data_cols, strict=True):
    if k not in twice:
      run_of.setdefault(j, []).append(k)
  sel = [(b, k) for b, j in enumerate(index.box_classes.tolist()) for k in run_of.get(j, [])]
  at = np.array([b for b, _ in sel], np.int64)
  return dataclasses.replace(
    index,
    box_rows=np.asarray(index.box_rows)[at],
    box_classes=np.array([k for _, k in sel], np.int64),
    box_xywh=np.asarray(index.box_xywh).reshape(-1, 4)[at],
  )


def data_config_of(config, source: str | None):
  """The run's config reading `source`'s data (its split and label policies; the run's
  classes stay its own), or `config` itself for None or the run's own source."""
  if source is None or source == pipeline.options_of(config)["source"]:
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  out.data.source = source
  return out


def localization_results(
  boxed, preds, options: EvalOptions, classes: Sequence[str], box_space: float | None
) -> tuple[dict, dict | None]:
  """(`localization_metrics`, `protocol_metrics` or None) of the kept maps against the boxes
  of `boxed` (an index whose box classes are the run's; no box space: no protocols)."""
  cases = box_cases(boxed, preds.saliency)
  loc = localization_metrics(
    preds.saliency,
    cases,
    box_space or 0.0,
    classes=classes,
    taus=options.taus,
    ts=options.ts,
    progress=options.progress,
  )
  if not options.protocols or box_space is None:
    return loc, None
  return loc, protocol_metrics(boxed, preds, cases, options, classes, box_space)


def protocol_metrics(
  index, preds, cases, options: EvalOptions, classes: Sequence[str], box_space: float
) -> dict:
  """`localization.score_all` over the box cases with the run's probabilities."""
  t0 = time.perf_counter()
  probs = {int(r): p for r, p in zip(preds.rows, preds.probs, strict=True)}
  result = localization.score_all(
    localization.make_cases(cases, index.patient_ids, probs),
    preds.saliency,
    box_space,
    taus=options.taus,
    ts=options.protocol_ts,
    prob_cutoffs=options.prob_cutoffs,
    n_boot=options.n_boot,
    seed=options.seed,
    class_names=classes,
    image_ids=index.image_ids,
  )
  log.info(
    f"localization protocols over {sum(len(c) for c in cases.values())} cases in "
    f"{time.perf_counter() - t0:.1f} s"
  )
  return result


def operating_point_results(
  index, preds, split: str, options: EvalOptions, classes: Sequence[str]
) -> dict | None:
  """The valid split: per-class thresholds chosen by `options.operating_point` with their
  rates there (`operating_points.choose`; `lsemil export` writes them as thresholds.json).
  Another split with `options.thresholds` (a valid evaluation's): the rates at those stored
  thresholds, with 95 % patient-bootstrap intervals (`options.n_boot` resamples). Else None."""
  if split == "valid":
    ops = operating_points.choose(preds.probs, preds.labels, options.operating_point, classes)
    return {**ops, "fit_split": "valid"}
  stored = options.thresholds
  if not stored:
    return None
  patients = np.asarray(index.patient_ids)[preds.rows]
  rates = operating_points.rates(
    stored["thresholds"], preds.probs, preds.labels, patients, n_boot=options.n_boot,
    seed=options.seed,
  )  # fmt: skip
  keep = ("rule", "classes", "thresholds", "fit_split")
  return {**{k: stored.get(k) for k in keep}, "num_images": int(len(preds.rows)), **rates}


def calibration_results(predictor, config, data_dir, preds, options: EvalOptions):
  """(raw calibration, fitted calibration or None, fitted parameters or None) of a split.

  The fit runs on the valid split's probabilities through the same predictor (fitted on
  validation, applied at evaluate and predict time)."""
  classes = findings.of_config(config)
  raw = calibration.calibration_metrics(preds.probs, preds.labels, classes)
  if not options.calibrate:
    return raw, None, None
  if options.calibrate not in calibration.METHODS:
    raise ConfigError(f"--calibrate {options.calibrate}: choose one of {calibration.METHODS}")
  rows = pipeline.split_rows(config, data_dir, "valid")
  valid = engine.collect(
    engine.predict_split(predictor, config, data_dir, "valid"), rows, f"{data_dir} valid"
  )
  check_finite(open_index(config, data_dir), valid, classes)
  params = calibration.fit(options.calibrate, valid.probs, valid.labels, classes)
  params["fit_split"] = "valid"
  fitted = calibration.calibration_metrics(
    calibration.apply(params, preds.probs), preds.labels, classes
  )
  fitted.update(method=options.calibrate, fit_split="valid", fit_images=int(len(valid.rows)))
  log.info(
    f"{options.calibrate} calibration fitted on {len(valid.rows)} valid images: ECE "
    f"{raw['ece_overall']:.4f} -> {fitted['ece_overall']:.4f}"
  )
  return raw, fitted, params


def evaluate_checkpoint(
  loaded: engine.LoadedModel,
  data_dir: str,
  split: str = "test",
  options: EvalOptions = EvalOptions(),
) -> EvalRun:
  """`evaluate_split` of a loaded checkpoint (`engine.load`), with the saliency source of
  `options` (else the run's config, `registry.saliency_settings`)."""
  source, level = registry.saliency_settings(
    loaded.config, options.saliency, options.gradcam_level
  )
  predictor = engine.Predictor(
    loaded.model, loaded.variables, saliency_source=source, gradcam_level=level
  )
  run = evaluate_split(
    predictor,
    loaded.config,
    data_dir,
    split,
    options,
    step=loaded.step,
    checkpoint=loaded.checkpoint,
  )
  run.result.which = loaded.info.get("which")
  return run


def write_outputs(run: EvalRun, config, data_dir: str, out) -> dict[str, epath.Path]:
  """Writes F.json, F.csv (metrics), F_predictions.csv (per image) and F_saliency_boxes.npz
  (process 0 only); returns their paths."""
  out = fileio.as_path(out)
  sal_path, pred_path = saliency_path_for(out), predictions_path_for(out)
  run.result.saliency_file = sal_path.name
  run.result.predictions_file = pred_path.name
  write_saliency(
    sal_path,
    run.predictions.saliency,
    run.predictions.levels,
    run.figure,
    run.index,
    run.data_config or config,
    data_dir,
    run.result.split,
    run.classes or findings.of_config(config),
  )
  engine.write_split_predictions(
    pred_path, run.index, run.predictions, run.classes or findings.of_config(config)
  )
  paths = {}
  if run.calibration_params is not None:
    paths["calibration"] = calibration_path_for(out)
    run.result.calibration_file = paths["calibration"].name
    fileio.write_json(paths["calibration"], run.calibration_params)
  json_path, csv_path = write_evaluation(run.result.to_dict(), out)
  return {
    "json": json_path,
    "csv": csv_path,
    "predictions": pred_path,
    "saliency": sal_path,
    **paths,
  }


def stored_images(config, data_dir, split: str, rows: Sequence[int]) -> np.ndarray:
  """The stored (e.g. 512 x 512) images of some rows of a split, uint8 (n, H, W)."""
  if not rows:
    return np.zeros((0, 1, 1), np.uint8)
  source = pipeline.open_source(data_dir, split, **pipeline.options_of(config))
  pos = {int(r): i for i, r in enumerate(source.rows)}
  return np.stack([source[pos[int(r)]]["image"] for r in rows])


def write_saliency(path, kept, levels, fig, index, config, data_dir, split, classes) -> None:
  """Writes the kept maps and the Figure 1/3 material as one compressed .npz (`classes`:
  the maps' channels, the run's classes; no box space is NaN)."""
  rows = np.array(sorted(kept), np.int64)
  some = next(iter(kept.values()), None)
  shape = some.shape if some is not None else (0, 0, len(classes))
  arrays: dict[str, np.ndarray] = {
    "rows": rows,
    "image_ids": np.array([index.image_ids[r] for r in rows], dtype=str),
    "saliency": (
      np.stack([kept[r] for r in rows]).astype(np.float16)
      if len(rows)
      else np.zeros((0, *shape), np.float16)
    ),
    "classes": np.array(classes),
    "box_space": np.array(box_space_of(index) or np.nan),
    "split": np.array(split),
  }
  fig = [(r, k) for r, k in fig if r in levels]
  arrays["fig_rows"] = np.array([r for r, _ in fig], np.int64)
  arrays["fig_classes"] = np.array([k for _, k in fig], np.int64)
  arrays["fig_images"] = stored_images(config, data_dir, split, [r for r, _ in fig])
  n_levels = len(levels[fig[0][0]]) if fig else 0
  arrays["num_levels"] = np.array(n_levels)
  for lv in range(n_levels):
    arrays[f"levels_{lv}"] = np.stack([levels[r][lv] for r, _ in fig]).astype(np.float16)
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  fileio.write_bytes(path, buf.getvalue())


def load_saliency(path: str | os.PathLike) -> dict:
  """The .npz of `write_saliency` as a dict: 'maps' {row: (N, N, K) float32},
  'figure' [(row, class index, image, [level maps (n_l, n_l, K)])], 'box_space', 'split'."""
  path = fileio.as_path(path)
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
    raise OutputError(f"{path}: not a saliency file of `lsemil evaluate` ({e})") from e


# --------------------------------------------------------------------------- JSON / CSV


def load_evaluation(path: str | os.PathLike) -> dict:
  """An evaluation JSON, with null metric values turned back into NaN."""
  result = fileio.read_json(path)
  if not isinstance(result, dict):
    raise OutputError(f"{path}: not a JSON object")
  for key in _NUMERIC_KEYS:
    if key in result:
      result[key] = fileio.none_to_nan(result[key])
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
  for name, by_cls in (result.get("protocols") or {}).items():
    if name == "settings":
      continue
    metric, _, t = name.partition("@")
    for c, e in by_cls.items():
      tau = e.get("tau")
      tau = "" if tau is None or (isinstance(tau, float) and math.isnan(tau)) else f"{tau:g}"
      w.writerow(
        [f"loc_{metric}", c, tau, t, num(e.get("value")), num(e.get("lo")), num(e.get("hi"))]
      )
  for key, suffix in (("calibration", ""), ("calibration_fitted", "_fitted")):
    cal = result.get(key) or {}
    for m in ("ece", "brier"):
      for c, v in cal.get(m, {}).items():
        w.writerow([m + suffix, c, "", "", num(v), "", ""])
      if m + "_overall" in cal:
        w.writerow([m + suffix, "overall", "", "", num(cal[m + "_overall"]), "", ""])
  ops = result.get("operating_points") or {}
  for key in ("thresholds", "sensitivity", "specificity", "ppv"):
    lo, hi = ops.get(f"{key}_lo") or (), ops.get(f"{key}_hi") or ()
    for k, (c, v) in enumerate(zip(ops.get("classes") or (), ops.get(key) or (), strict=False)):
      bounds = [num(b[k]) if k < len(b) else "" for b in (lo, hi)]
      w.writerow([f"op_{key}", c, "", "", num(v), *bounds])
  return buf.getvalue()


def calibration_path_for(out) -> epath.Path:
  """F_calibration.json beside F.json: the fitted recalibration (`calibration.fit`)."""
  out = fileio.as_path(out)
  return out.with_name(out.stem + CALIBRATION_SUFFIX)


def saliency_path_for(out) -> epath.Path:
  out = fileio.as_path(out)
  return out.with_name(out.stem + SALIENCY_SUFFIX)


def predictions_path_for(out) -> epath.Path:
  out = fileio.as_path(out)
  return out.with_name(out.stem + PREDICTIONS_SUFFIX)


def write_evaluation(result: Mapping, out) -> tuple[epath.Path, epath.Path]:
  """Writes F.json and F.csv (atomically when local); returns their paths."""
  out = fileio.as_path(out)
  csv_path = out.with_suffix(".csv")
  fileio.write_json(out, result)
  fileio.write_text(csv_path, to_csv(result))
  return out, csv_path


# --------------------------------------------------------------------------- workdirs


def resolve_data_dir(config, data_dir) -> str:
  """--data-dir, else the run's `config.data.data_dir`; raises naming what is missing."""
  chosen = data_dir or config.data.data_dir
  if not chosen:
    raise DataError("no --data-dir given and the run's config records no data.data_dir")
  chosen = fileio.resolve(chosen)
  nih.require_local(chosen)
  if not fileio.as_path(chosen).is_dir():
    raise DataError(f"{chosen}: dataset folder not found")
  return chosen


def matches(
  result: Mapping,
  *,
  step: int,
  split: str,
  data_dir,
  saliency: str | None = None,
  needs: Sequence[str] = (),
) -> bool:
  """Whether a stored evaluation is of this checkpoint step, split and dataset (and, when
  given, of this saliency source, and holding every key of `needs`, e.g. 'protocols', which
  evaluations written before them lack)."""
  try:
    same_dir = fileio.resolve(result.get("data_dir", "")) == fileio.resolve(data_dir)
  except OSError:
    same_dir = False
  return (
    result.get("step") is not None
    and int(result["step"]) == int(step)
    and result.get("split") == split
    and same_dir
    and (saliency is None or result.get("saliency_source", "model") == saliency)
    and all(result.get(k) is not None for k in needs)
  )
