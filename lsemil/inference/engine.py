"""The one inference path: every consumer of the model's predictions goes through here.

Validation inside training (`lsemil.training.trainer`), `lsemil evaluate`, `lsemil reproduce` and
`lsemil predict` all (big_vision's evaluator pattern, `big_vision/evaluators/common.py`):

1. load weights with `load` (a `LoadedModel`, no optimizer state: from a training workdir or
   a folder of `lsemil export`), or take them from the training state;
2. turn images into model input with the one contract `model_input` (a decoded grey image
   of any size -> uint8 (S, S, 1), exactly as the evaluation pipeline does:
   `lsemil.data.pipeline.eval_image`);
3. run a `Predictor`: the model's forward (Sec 3.6: class probabilities from LSE-LBA pooling,
   and the saliency maps S only where asked), compiled once per output set, on the device
   mesh of all local devices (multi-host as training is: each process feeds its part of a
   global batch, every process reads the whole replicated output). The map comes from a
   saliency source (`lsemil.models.registry`): 'model' (the MIL model's own S) or, for the GAP
   baseline, 'gradcam' (at `gradcam_level`) or 'cam' (`lsemil.models.posthoc.forward`, the same
   contract, min-max scaled maps);
4. stream a split with `predict_split`: `SplitBatch`es of rows, labels and probabilities
   (and the saliency of the rows asked for), every image exactly once, in index order.

Per-image predictions are formatted by `predictions_csv` in one format for every command
(image_id, patient_id, one probability column per class of the run, named as the checkpoint's
config names them: `lsemil.data.findings.of_config`); `write_split_predictions` writes a
split's and `read_predictions_csv` reads them back.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from lsemil.core import fileio
from lsemil.core.errors import CheckpointError, DataError
from lsemil.data import findings, pipeline
from lsemil.models import mil, posthoc, registry
from lsemil.runtime import bundle, checkpointing, sharding

PROB_FORMAT = "{:.9g}"  # float32 probabilities round-trip through the CSV


class LoadedModel(NamedTuple):
  """Weights of one checkpoint, ready for `Predictor` (host numpy arrays)."""

  config: ml_collections.ConfigDict
  model: mil.MultiResolutionMIL | Any  # or gap_classifier.GlobalAveragePoolingClassifier
  variables: dict  # {'params', 'batch_stats'?}
  step: int
  checkpoint: str  # the step folder
  info: dict  # 'which', and the saved validation AUCs of this step where present


def load(path: str | os.PathLike, which: str = "best") -> LoadedModel:
  """Loads a training workdir's best (or latest) checkpoint, its checkpoints/ folder, one
  step folder W/checkpoints/<step>, or a folder of `lsemil export` (`which` is ignored there:
  it holds one model), local or gs://. Raises CheckpointError naming the path."""
  path = fileio.resolve(path)
  if bundle.is_bundle(path):
    config, model, variables, info = bundle.read(path)
    return LoadedModel(config, model, variables, info["step"], info["checkpoint"], info)
  try:
    config, model, variables, step, info = checkpointing.load_inference(path, which=which)
  except FileNotFoundError as e:
    raise CheckpointError(str(e)) from None
  return LoadedModel(config, model, variables, step, info["checkpoint"], info)


# --------------------------------------------------------------------------- the contract


def model_input(gray: np.ndarray, input_size: int) -> np.ndarray:
  """A decoded uint8 (H, W) grey image of any size -> the uint8 (S, S, 1) model input.

  Exactly the evaluation pipeline's transform (`pipeline.eval_image`: images above 512 px
  resized to 512 as `lsemil prepare` does, Sec 4.2, then one warp to the model side S). The
  model scales uint8 to [0, 1] itself, on the device.
  """
  if gray.dtype != np.uint8 or gray.ndim != 2:
    raise ValueError(f"model_input takes a uint8 (H, W) image, got {gray.dtype} {gray.shape}")
  return pipeline.eval_image(gray, int(input_size))[:, :, None]


# --------------------------------------------------------------------------- the forward


def _check_input(images) -> None:
  if images.dtype != np.uint8:
    raise TypeError(f"the model input is uint8 (see inference.model_input), got {images.dtype}")


def _forward(variables, images, *, model, saliency: bool, levels: bool) -> dict:
  _check_input(images)
  out = model.apply(variables, images, train=False)
  keep = {"probs": out["probs"]}
  if saliency:
    keep["saliency"] = out["saliency"]
  if levels:
    keep["saliency_levels"] = out["saliency_levels"]
  return keep


def forward(model, variables, *, saliency: bool = True, levels: bool = False) -> Callable:
  """uint8 (B, S, S, 1) images -> {'probs', 'saliency'?, 'saliency_levels'?}: the MIL model's
  forward of `Predictor` with `variables` bound, not jitted (what `lsemil export` converts to
  ONNX, `lsemil.inference.onnx_graph`)."""
  return functools.partial(_forward, variables, model=model, saliency=saliency, levels=levels)


def jitted_forward(model, mesh: jax.sharding.Mesh, *, saliency: bool, levels: bool) -> Callable:
  """The MIL model's forward of `Predictor` (uint8 images in, outputs replicated), jitted
  on `mesh`: what validation, evaluate and predict run; `lsemil aot` compiles it too."""
  fwd = functools.partial(_forward, model=model, saliency=saliency, levels=levels)
  return jax.jit(fwd, out_shardings=sharding.replicated(mesh))


def _posthoc_forward(variables, images, *, model, source, level, saliency, levels) -> dict:
  """The GAP model's forward with Grad-CAM / CAM maps (`posthoc.forward`, the same contract)."""
  _check_input(images)
  out = posthoc.forward(
    variables, images, model=model, source=source, level=level, saliency=saliency, levels=levels
  )
  return {k: out[k] for k in ("probs", "saliency", "saliency_levels") if k in out}


class Predictor:
  """The model's forward on the mesh of all devices, compiled once per output set.

  `variables`: {'params', 'batch_stats'?}, host arrays (replicated onto the mesh here) or
  jax arrays already placed (the training state's, FSDP-sharded or not).
  `saliency_source`: where the maps come from (`lsemil.models.registry`): 'model' for the MIL
  model (the default), 'gradcam' (the GAP model's default; at `gradcam_level`, default -1 =
  the coarsest level) or 'cam' for the GAP baseline; ConfigError naming the option for a
  source the model does not have. The probabilities do not depend on it.
  """

  def __init__(
    self,
    model,
    variables: Mapping,
    mesh: jax.sharding.Mesh | None = None,
    *,
    saliency_source: str | None = None,
    gradcam_level: int | None = None,
  ):
    self.model = model
    self.arch = registry.arch_of(model)
    if saliency_source is None:
      saliency_source = registry.SOURCES[self.arch][0]
    if saliency_source == "gradcam" and gradcam_level is None:
      gradcam_level = registry.DEFAULT_GRADCAM_LEVEL
    n_levels = len(model.widths) if self.arch == registry.GAP else 0
    registry.check_source(self.arch, saliency_source, gradcam_level, n_levels)
    self.saliency_source = saliency_source
    self.gradcam_level = int(gradcam_level) if saliency_source == "gradcam" else None
    self.mesh = mesh if mesh is not None else sharding.create_mesh()
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    if any(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables)):
      variables = jax.device_put(dict(variables), sharding.replicated(self.mesh))
    self.variables = dict(variables)
    self._fns: dict[tuple[bool, bool], Callable] = {}

  @property
  def input_size(self) -> int:
    return int(self.model.input_size)

  def _fn(self, saliency: bool, levels: bool) -> Callable:
    key = (bool(saliency), bool(levels))
    if key not in self._fns:
      if self.saliency_source == "model":
        self._fns[key] = jitted_forward(self.model, self.mesh, saliency=key[0], levels=key[1])
        return self._fns[key]
      fwd = functools.partial(
        _posthoc_forward,
        model=self.model,
        source=self.saliency_source,
        level=self.gradcam_level,
        saliency=key[0],
        levels=key[1],
      )
      self._fns[key] = jax.jit(fwd, out_shardings=sharding.replicated(self.mesh))
    return self._fns[key]

  def __call__(self, local_images: np.ndarray, *, saliency=False, levels=False) -> dict:
    """This process's uint8 (b, S, S, 1) images of a global batch -> the whole global
    batch's outputs as numpy: probs (B, K), saliency (B, N, N, K), saliency_levels [...]
    (a post-hoc source has one level: its map)."""
    images = sharding.global_batch(np.asarray(local_images), self.batch_sharding)
    posthoc = self.saliency_source != "model"
    # A post-hoc map has one level: one program serves both outputs.
    key = (saliency or levels, False) if posthoc else (saliency, levels)
    with jax.set_mesh(self.mesh):
      out = self._fn(*key)(self.variables, images)
    out = sharding.to_host(out)
    if posthoc and levels:
      out["saliency_levels"] = [out["saliency"]]
      if not saliency:
        del out["saliency"]
    return out

  def predict_images(self, images: np.ndarray, batch_size: int, **outputs) -> dict:
    """Single-process convenience: any number of uint8 (n, S, S, 1) images, run in fixed
    batches (padded with zeros: one compile), outputs cut back to n."""
    n = len(images)
    batch = max(1, int(batch_size))
    batch += -batch % self.mesh.devices.size  # divisible over the devices
    parts: list[dict] = []
    for start in range(0, n, batch):
      chunk = images[start : start + batch]
      padded = np.zeros((batch, *images.shape[1:]), np.uint8)
      padded[: len(chunk)] = chunk
      out = self(padded, **outputs)
      parts.append(jax.tree.map(lambda x, m=len(chunk): x[:m], out))
    if not parts:
      return {}
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


# --------------------------------------------------------------------------- a split


class SplitBatch(NamedTuple):
  """The real (unpadded) examples of one global eval batch, on every process."""

  rows: np.ndarray  # int64 (n,): rows of the dataset index
  labels: np.ndarray  # float32 (n, K)
  probs: np.ndarray  # float32 (n, K)
  saliency: dict[int, np.ndarray]  # row -> (N, N, K) float32, for the rows asked for
  levels: dict[int, list[np.ndarray]]  # row -> per-level maps, for the rows asked for


def predict_split(
  predictor: Predictor,
  config: ml_collections.ConfigDict,
  data_dir: str,
  split: str,
  *,
  saliency_rows: Collection[int] = (),
  level_rows: Collection[int] = (),
) -> Iterator[SplitBatch]:
  """Streams one split of `data_dir` through the model, global batch by global batch.

  `config.train.eval_batch_size` images per global batch (each process reads its part,
  `lsemil.data.pipeline.make_eval_iter`). The saliency maps (and the per-level maps) of
  `saliency_rows` (`level_rows`) only are fetched: a batch without any runs the
  probabilities-only program. The decision is the same on every process: it is made from the
  global batch's rows, which every process knows (the split's index order).
  """
  global_batch = int(config.train.eval_batch_size)
  split_rows = pipeline.split_rows(config, data_dir, split)
  want_s, want_l = set(map(int, saliency_rows)), set(map(int, level_rows))
  batches = pipeline.make_eval_iter(
    config,
    data_dir,
    split,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  for b, batch in enumerate(batches):
    rows_here = split_rows[b * global_batch : (b + 1) * global_batch].tolist()
    need_s = any(r in want_s for r in rows_here)
    need_l = any(r in want_l for r in rows_here)
    local = {k: np.asarray(batch[k]) for k in ("row", "mask", "labels")}
    out = predictor(np.asarray(batch["image"]), saliency=need_s, levels=need_l)
    meta = _gather_local(local, predictor)
    keep = meta["mask"].astype(bool)
    rows = meta["row"][keep].astype(np.int64)
    sal, lev = {}, {}
    for i in np.flatnonzero(keep):
      r = int(meta["row"][i])
      if need_s and r in want_s:
        sal[r] = np.asarray(out["saliency"][i], np.float32)
      if need_l and r in want_l:
        lev[r] = [np.asarray(x[i], np.float32) for x in out["saliency_levels"]]
    yield SplitBatch(
      rows=rows,
      labels=meta["labels"][keep].astype(np.float32),
      probs=np.asarray(out["probs"], np.float32)[keep],
      saliency=sal,
      levels=lev,
    )


def _gather_local(local: dict, predictor: Predictor) -> dict:
  """Each process's part of a global batch's host metadata -> the whole batch, everywhere
  (process p holds global positions [p*b, (p+1)*b), `make_eval_iter`)."""
  del predictor
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  out = {}
  for k, x in local.items():
    g = np.asarray(multihost_utils.process_allgather(x, tiled=False))
    out[k] = g.reshape((-1, *x.shape[1:]))
  return out


class SplitPredictions(NamedTuple):
  """A whole split's predictions, in index-row order."""

  rows: np.ndarray
  labels: np.ndarray
  probs: np.ndarray
  saliency: dict[int, np.ndarray]
  levels: dict[int, list[np.ndarray]]


def collect(
  batches: Iterator[SplitBatch], expected_rows: np.ndarray, what: str
) -> SplitPredictions:
  """Concatenates `predict_split`'s batches; raises unless every expected row came once."""
  rows, labels, probs, sal, lev = [], [], [], {}, {}
  for b in batches:
    rows.append(b.rows)
    labels.append(b.labels)
    probs.append(b.probs)
    sal.update(b.saliency)
    lev.update(b.levels)
  k = labels[0].shape[1] if labels else 0
  rows_a = np.concatenate(rows) if rows else np.zeros((0,), np.int64)
  if len(rows_a) != len(expected_rows) or not np.array_equal(
    np.sort(rows_a), np.sort(expected_rows)
  ):
    raise RuntimeError(
      f"{what}: predicted {len(rows_a)} images ({len(np.unique(rows_a))} distinct) of the "
      f"{len(expected_rows)} expected"
    )
  order = np.argsort(rows_a, kind="stable")
  return SplitPredictions(
    rows=rows_a[order],
    labels=(np.concatenate(labels) if labels else np.zeros((0, k), np.float32))[order],
    probs=(np.concatenate(probs) if probs else np.zeros((0, k), np.float32))[order],
    saliency=sal,
    levels=lev,
  )


# --------------------------------------------------------------------------- per-image CSV

ID_COLUMNS = ("image_id", "patient_id")
FIRST_EXTRA = "path"  # `lsemil predict`'s first column after the probabilities


def csv_columns(classes: Sequence[str]) -> tuple[str, ...]:
  """The header of `predictions_csv` before any extra column: the ids, then the classes."""
  return (*ID_COLUMNS, *classes)


def predictions_csv(
  image_ids: Sequence[str],
  patient_ids: Sequence[Any],
  probs: np.ndarray,
  classes: Sequence[str],
  extra: Mapping[str, Sequence[str]] | None = None,
) -> str:
  """One row per image: image_id, patient_id, the probability of each of `classes` (the
  run's, in output order; 9 significant digits), then any `extra` columns. Every command
  writes this format."""
  extra = dict(extra or {})
  if np.shape(probs)[1:] not in ((len(classes),), ()):
    raise ValueError(f"probabilities of {np.shape(probs)[1]} classes, {len(classes)} names")
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow([*csv_columns(classes), *extra])
  for i, (image_id, patient) in enumerate(zip(image_ids, patient_ids, strict=True)):
    cells = [PROB_FORMAT.format(float(p)) for p in probs[i]]
    w.writerow(
      [image_id, "" if patient is None else patient, *cells, *(v[i] for v in extra.values())]
    )
  return buf.getvalue()


def csv_classes(header: Sequence[str]) -> tuple[str, ...]:
  """The class columns of a `predictions_csv` header: after the ids, up to `FIRST_EXTRA`."""
  rest = list(header[len(ID_COLUMNS) :])
  return tuple(rest[: rest.index(FIRST_EXTRA)] if FIRST_EXTRA in rest else rest)


def read_predictions_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{image_id: float64 (K,) probabilities} of a `predictions_csv` file, in its class
  columns' order (`csv_classes`)."""
  text = fileio.as_path(path).read_text()
  reader = csv.DictReader(io.StringIO(text))
  if tuple(reader.fieldnames or ())[: len(ID_COLUMNS)] != ID_COLUMNS:
    raise DataError(f"{path}:1: not a predictions CSV (expected {', '.join(ID_COLUMNS)} first)")
  classes = csv_classes(reader.fieldnames)
  out = {}
  for rec in reader:
    probs = np.array([float(rec[c]) for c in classes])
    if not np.all(np.isfinite(probs)):  # else a class's AUC would be silently undefined
      raise DataError(f"{path}: image {rec['image_id']} has a non-finite probability")
    out[rec["image_id"]] = probs
  return out


def write_split_predictions(
  path, index, preds: SplitPredictions, classes: Sequence[str] | None = None
) -> None:
  """The per-image predictions of a split of `index` (image_ids, patient_ids): image_id,
  patient_id, the probability of each of the run's `classes` (`findings.of_config` of the
  run's config; None: the index's own classes, NIH's for an `NihIndex`)."""
  if classes is None:
    classes = getattr(index, "classes", None) or findings.of_config({})
  text = predictions_csv(
    [index.image_ids[r] for r in preds.rows],
    [np.asarray(index.patient_ids)[r].item() for r in preds.rows],
    preds.probs,
    classes,
  )
  fileio.write_text(path, text)
