"""Table 4's cheXlocalize and detection columns, per source of localization truth, through
`lsemil score`'s own code (`lsemil.workflows.scoring.score`): one scoring path.

Each shown source of Table 4 (a label's first run, a Grad-CAM / CAM baseline, the constant map,
the centre prior) becomes a `scoring.MapSet` of the images with truth:

- NIH (`nih_scores`): the evaluation's stored maps (its saliency .npz: the split's box images)
  against the index's boxes, in the box space's pixels (images box_space x box_space), the
  probabilities of the evaluation's per-image CSV, the index's patient ids. Writing the same
  maps, boxes and probabilities as `lsemil score`'s inputs gives the same numbers.
- Another source (`source_scores`, `lsemil reproduce --extra-truth SOURCE=DIR`): the split's
  images of DIR with a box or mask of a class the synonym table pairs with a run class
  (`evaluation.scoring_of`) go through the one inference path (`engine.predict_split`); the
  run class's map is scored as its data class, against the reader's truth
  (`scoring.truth_from_source`, as `lsemil score --source`).

The model-free sources carry the first run's probabilities (the same classes count as
predicted in the detection protocols, the same cutoff decisions: only the map differs); the
constant map predicts nothing (min-max scaling makes any constant zero), the centre prior
(`baselines.centre_prior`) the same central region for every class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lsemil.core import log
from lsemil.core.errors import UserError
from lsemil.data import chexlocalize_truth, findings, pipeline
from lsemil.inference import engine
from lsemil.metrics import baselines
from lsemil.models import registry
from lsemil.workflows import evaluation, scoring

FAMILIES = ("chexlocalize", "detection")  # `scoring.PROTOCOLS` Table 4 and the WSRPN table use
CENTRE_SIDE = 64  # the centre prior's map side (as Table 4's score_all centre prior)


def map_set(image_ids, patient_ids, classes, maps, probs, hw) -> scoring.MapSet:
  """A `scoring.MapSet` of (n, n, K) maps (channels = classes), probs (N, K) or None, and one
  (height, width) for every image (None: the source's, `scoring.truth_from_source`)."""
  arr = np.stack([np.asarray(m, np.float32) for m in maps]).transpose(0, 3, 1, 2)
  sizes = np.tile(np.asarray(hw if hw is not None else arr.shape[2:], np.int64), (len(arr), 1))
  p = None if probs is None else np.asarray(probs, np.float64)
  return scoring.MapSet(
    tuple(str(i) for i in image_ids), tuple(classes), arr, p, sizes,
    tuple(str(i) for i in patient_ids), hw is not None,
  )  # fmt: skip


def model_free(ms: scoring.MapSet) -> dict[str, scoring.MapSet]:
  """{'constant', 'centre'}: the model-free maps of a MapSet's images, classes and
  probabilities."""
  n, c = len(ms.image_ids), len(ms.classes)
  centre = np.broadcast_to(baselines.centre_prior(CENTRE_SIDE), (n, c, CENTRE_SIDE, CENTRE_SIDE))
  return {
    "constant": scoring.MapSet(ms.image_ids, ms.classes, np.zeros((n, c, 8, 8), np.float32),
                               ms.probs, ms.image_sizes, ms.patient_ids, ms.sizes_given),
    "centre": scoring.MapSet(ms.image_ids, ms.classes, np.ascontiguousarray(centre), ms.probs,
                             ms.image_sizes, ms.patient_ids, ms.sizes_given),
  }  # fmt: skip


def _probs_at(run, index, split: str, rows) -> np.ndarray | None:
  if run.probs is None:
    return None
  pos = {int(r): i for i, r in enumerate(index.rows(split))}
  return run.probs[[pos[int(r)] for r in rows]]


def nih_boxes(index, rows, classes) -> tuple[dict, list]:
  """({(image id, class): [(x, y, w, h)]}, one image id per box in the index's order) of the
  boxes on `rows`, in box-space pixels (`scoring.read_boxes`'s form)."""
  keep = set(int(r) for r in rows)
  boxes: dict = {}
  order = []
  for r, k, xywh in zip(index.box_rows, index.box_classes, index.box_xywh, strict=True):
    if int(r) in keep:
      im = str(index.image_ids[r])
      boxes.setdefault((im, classes[k]), []).append(tuple(float(v) for v in xywh))
      order.append(im)
  return boxes, order


def nih_scores(runs: Sequence, index, split: str, n_boot: int, seed: int = 0) -> dict[str, dict]:
  """{source name: `scoring.score` result (FAMILIES)} of the runs with stored maps and the
  model-free sources, against the index's boxes on the split's box images."""
  classes = findings.of_config(runs[0].config)
  rows = sorted(evaluation.box_cases(index, index.rows(split)))
  boxes, order = nih_boxes(index, rows, classes)
  side = int(round(index.box_space))
  sets = {}
  for run in runs:
    kept = [r for r in rows if r in ((run.saliency or {}).get("maps") or {})]
    if not kept:
      continue
    sets[run.name] = map_set(
      [index.image_ids[r] for r in kept], [index.patient_ids[r] for r in kept], classes,
      [run.saliency["maps"][r] for r in kept], _probs_at(run, index, split, kept), (side, side),
    )  # fmt: skip
  ids = [index.image_ids[r] for r in rows]
  if ids:
    blank = [np.zeros((1, 1, len(classes)), np.float32)] * len(rows)
    pids = [index.patient_ids[r] for r in rows]
    probs = _probs_at(runs[0], index, split, rows)  # the model-free maps: the first run's
    sets.update(model_free(map_set(ids, pids, classes, blank, probs, (side, side))))
  return {
    name: scoring.score(ms, boxes, n_boot, seed, protocols=FAMILIES, box_order=order)
    for name, ms in sets.items()
  }


# --------------------------------------------------------------------------- other sources


def truth_rows(idx, split: str) -> list[int]:
  """The rows of the split with a box or a mask (the reader's index)."""
  with_truth = set(np.asarray(idx.box_rows).tolist()) | {r for r, m in idx.masks.items() if m}
  return [int(r) for r in idx.rows(split) if int(r) in with_truth]


def _image_sizes(idx, rows) -> np.ndarray | None:
  """(n, 2) sizes of the rows when the release does not fix one: a mask's own size
  (CheXlocalize); None for a fixed size. A box source of varying sizes is refused."""
  if idx.image_size is not None:
    return None
  if not idx.masks:
    raise UserError(f"{idx.root}: {idx.source}'s images vary in size and its index does not "
                    "record them; its boxes cannot be placed on the maps (not scored)")
  out = []
  for r in rows:
    k = next(iter(idx.masks[r]))
    out.append(chexlocalize_truth.mask(idx, r, k).shape)
  return np.array(out, np.int64)


def _predicted_maps(run, source: str, data_dir, split: str, rows: Sequence[int], which: str):
  """({row: (n, n, K) map} of `rows`, {row: (K,) probabilities} of the split, the run's config
  reading the data) through the one inference path (`engine.predict_split`)."""
  loaded = engine.load(run.workdir, which)
  data_config = evaluation.data_config_of(loaded.config, source)
  sal, level = registry.saliency_settings(loaded.config, None if run.source == "model"
                                          else run.source, None)  # fmt: skip
  predictor = engine.Predictor(loaded.model, loaded.variables, saliency_source=sal,
                               gradcam_level=level)  # fmt: skip
  batches = engine.predict_split(predictor, data_config, data_dir, split, saliency_rows=rows)
  preds = engine.collect(batches, pipeline.split_rows(data_config, data_dir, split),
                         f"{data_dir} split {split!r}")  # fmt: skip
  probs = {int(r): p for r, p in zip(preds.rows, preds.probs, strict=True)}
  return preds.saliency, probs, data_config


def source_scores(
  runs: Sequence, source: str, data_dir, split: str, n_boot: int, *, which: str = "best",
  seed: int = 0,
) -> tuple[dict[str, dict], dict]:
  """({source name: `scoring.score` result}, the class mapping) of the runs' maps (and the
  model-free ones) on `source`'s data in `data_dir` (the folder as its reader reads it),
  against its reader's boxes or masks (`scoring.truth_from_source`)."""
  idx = evaluation.open_index(evaluation.data_config_of(runs[0].config, source), data_dir)
  rows = truth_rows(idx, split)
  if not rows:
    raise UserError(f"{data_dir}: no image of the {split} split has a {source} box or mask")
  sizes = _image_sizes(idx, rows)
  ids = [idx.image_ids[r] for r in rows]
  pids = [idx.patient_ids[r] for r in rows]
  families = ("chexlocalize",) if idx.masks else FAMILIES
  out: dict[str, dict] = {}
  mapping: dict = {}
  first = None
  for run in runs:
    log.info(f"{run.name}: maps of {len(ids)} {source} {split} images with truth ({data_dir})")
    maps, probs, data_config = _predicted_maps(run, source, data_dir, split, rows, which)
    sc = evaluation.scoring_of(run.config, data_config, idx.classes)
    mapping = sc.mapping or {}
    cols, names = _channels(sc, idx.classes)
    ms = map_set(ids, pids, names, [maps[r][..., cols] for r in rows],
                 np.stack([probs[r][cols] for r in rows]), None)  # fmt: skip
    if sizes is not None:
      ms = dataclasses.replace(ms, image_sizes=sizes, sizes_given=True)
    first = first or ms
    out[run.name] = _score_source(ms, source, data_dir, n_boot, seed, families)
  for name, ms in model_free(first).items():
    out[name] = _score_source(ms, source, data_dir, n_boot, seed, families)
  return out, mapping


def _channels(sc, data_classes) -> tuple[list[int], list[str]]:
  """(run channels, data class names) of the pairs: each data class once (its first pair)."""
  cols, names = [], []
  for k, j in zip(sc.model_cols, sc.data_cols, strict=True):
    if data_classes[j] not in names:
      cols.append(k)
      names.append(data_classes[j])
  return cols, names


def _score_source(ms, source, data_dir, n_boot, seed, families) -> dict:
  maps, boxes, masks, order = scoring.truth_from_source(ms, source, data_dir)
  return scoring.score(maps, boxes, n_boot, seed, masks, families, order)
