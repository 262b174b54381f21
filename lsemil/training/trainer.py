"""Training and validation of the multi-resolution MIL model (paper Sec 4.2).

The paper trains with Adam (lr 1e-3, weight decay 1e-5) on the multi-label BCE of the
pooled probabilities (Sec 3.6), with the Sec 4.2 augmentation, validates on a patient-wise
held-out part of train_val, stops early on the validation mean AUC, and keeps the best
model. `train_and_evaluate(config, workdir)` does exactly that:

  setup -> lock -> restore or init -> train_loop (log / validate / checkpoint) -> result

Banner sections: state & steps, config, validation, early stopping, stop requests, the run.

- `TrainState`: params, batch_stats ({} with GroupNorm), optimizer state, step, rng
  (raw uint32 key data, so orbax stores it as a plain array).
- `train_step` is a pure module-level function, compiled once by `make_train_step` with
  `jax.jit` and explicit shardings on the
  ('data', 'model') mesh of lsemil.runtime.sharding: batch over 'data', state replicated or
  FSDP-sharded (`config.train.fsdp`). BatchNorm statistics are over the global batch
  (jit, no axis_name). The same code runs on one device, many, or many hosts.
- Mixed precision: `config.model.dtype='bfloat16'` computes in bf16; params, Adam moments
  and the loss stay float32.
- Validation every `eval_every_epochs` epochs (or `eval_every_steps`) through the one
  inference path (`lsemil.inference.engine`, as `evaluate` and `predict`): per-class and mean AUC
  and the BCE on the valid split, per-image predictions in W/validation_predictions.csv; early
  stopping after `patience` evaluations without improvement;
  orbax keeps the last `keep_checkpoints` plus the best by validation mean AUC
  (lsemil.runtime.checkpointing).
- A non-finite loss (or parameter norm) stops the run with `NonFiniteLossError` naming the
  step; nothing after the last good checkpoint is saved.
- SIGTERM / SIGINT (`StopRequests`; multi-host: jax's preemption sync point) save a
  checkpoint at the next step boundary and raise `Interrupted` (exit 75); rerunning resumes
  exactly. A second `lsemil train` on a workdir in use is refused (`training.workdir_lock`), and
  resuming with another model, seed, split or batch size is refused before anything is
  written (`check_resume_config`).
- Fine-tuning: `train.init_from` starts a new workdir from another model's backbone and the
  head rows of the classes both have (`lsemil.training.initialization`); `train.freeze=backbone`
  trains the head only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import tempfile
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import struct

from lsemil.core import configuration, fileio, log
from lsemil.core.errors import ConfigError, DataError, Interrupted, NonFiniteLossError
from lsemil.data import findings, index, nih, pipeline, sources
from lsemil.inference import engine
from lsemil.metrics import classification
from lsemil.models import mil, registry
from lsemil.runtime import checkpointing, sharding
from lsemil.training import initialization, metric_writer, objective, workdir_lock

CONFIG_FILE = "config.json"
VALIDATION_PREDICTIONS = "validation_predictions.csv"  # per image, the latest validation
_CHEAP_CPU_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}


class TrainState(struct.PyTreeNode):
  """Everything a train step reads and writes (a pytree; checkpointed by orbax)."""

  step: jax.Array  # int32 scalar: completed steps
  params: Any
  batch_stats: Any  # {} when config.model.norm == 'group'
  opt_state: Any
  rng: jax.Array  # uint32 key data of the run's base key; steps fold in the step number


# --------------------------------------------------------------------------- state & steps


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The paper's optimizer (Sec 4.2): Adam with coupled L2 weight decay; with
  `train.freeze=backbone`, on the head only (`initialization.freeze_backbone`)."""
  tx = objective.paper_optimizer(
    float(config.train.learning_rate), float(config.train.weight_decay)
  )
  if config.train.get("freeze", "none") == "backbone":
    tx = initialization.freeze_backbone(tx)
  return tx


def create_train_state(
  *, model: mil.MultiResolutionMIL, tx: optax.GradientTransformation, seed: int
) -> TrainState:
  """A fresh state from `seed` (pure: jit it with `out_shardings` to create it sharded)."""
  init_rng, state_rng = jax.random.split(jax.random.key(seed))
  x = jnp.zeros((1, model.input_size, model.input_size, 1), jnp.float32)
  variables = model.init({"params": init_rng}, x, train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=jax.random.key_data(state_rng),
  )


def _sharpness(model: mil.MultiResolutionMIL, params: Any) -> jax.Array | None:
  """Mean LSE-LBA sharpness r = r0 + exp(beta) (Eq. 4), logged as a training metric."""
  beta = params.get("pool", {}).get("beta") if model.pooling == "lse_lba" else None
  if beta is None:
    return None
  return jnp.mean(model.r0 + jnp.exp(beta))


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: mil.MultiResolutionMIL,
  tx: optax.GradientTransformation,
  frozen_backbone: bool = False,
  masked: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on the BCE of the pooled probabilities (Sec 3.6, 4.2). Pure.

  `batch`: image (B, S, S, 1) uint8 (or float32 in [0, 1]), labels (B, K) float32. Returns the new
  state and float32 scalars: loss, grad_norm, param_norm (after the update), r (LSE-LBA).
  `masked` (a source with unknown labels, `masked_loss`): labels may hold NaN, and the BCE
  is `objective.masked_binary_cross_entropy`; else the paper's `binary_cross_entropy`.
  `frozen_backbone` (train.freeze=backbone): BatchNorm normalises with the running statistics
  (train=False) and they are not updated, so the frozen backbone computes at training what it
  computes at evaluation (Keras' frozen BatchNorm); `tx` leaves its parameters unchanged.
  """
  use_bn = bool(state.batch_stats) and not frozen_backbone

  def loss_fn(params):
    variables = {"params": params}
    if use_bn:
      variables["batch_stats"] = state.batch_stats
      out, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
      new_stats = updates["batch_stats"]
    else:
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      train = not frozen_backbone
      out, new_stats = model.apply(variables, batch["image"], train=train), state.batch_stats
    bce = objective.masked_binary_cross_entropy if masked else objective.binary_cross_entropy
    loss = bce(out["probs"], batch["labels"])
    return loss, new_stats

  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
  )
  out = {
    "loss": loss.astype(jnp.float32),
    "grad_norm": optax.global_norm(grads).astype(jnp.float32),
    "param_norm": optax.global_norm(params).astype(jnp.float32),
  }
  r = _sharpness(model, params)
  if r is not None:
    out["r"] = r.astype(jnp.float32)
  return new_state, out


def make_train_step(
  model, tx, mesh: jax.sharding.Mesh, state_sharding: Any, *, frozen_backbone: bool = False,
  masked: bool = False,
):
  """`train_step` jitted: state in/out with `state_sharding`, batch over 'data', state donated."""
  return jax.jit(
    functools.partial(
      train_step, model=model, tx=tx, frozen_backbone=frozen_backbone, masked=masked
    ),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def abstract_state(model, tx, seed: int) -> TrainState:
  return jax.eval_shape(functools.partial(create_train_state, model=model, tx=tx, seed=seed))


def state_sharding_for(config, model, tx, mesh) -> tuple[TrainState, Any]:
  """(abstract state, its shardings) for `config.train.fsdp` on `mesh`."""
  abstract = abstract_state(model, tx, int(config.seed))
  shardings = sharding.state_shardings(
    abstract,
    mesh,
    fsdp=bool(config.train.fsdp),
    min_size=int(config.train.fsdp_min_size),
  )
  return abstract, shardings


def init_state(config, model, tx, mesh, shardings) -> TrainState:
  """The fresh state, created directly in its shardings."""
  with jax.set_mesh(mesh):
    create = functools.partial(create_train_state, model=model, tx=tx, seed=int(config.seed))
    lowered = jax.jit(create, out_shardings=shardings).lower()
    # Init runs once: on CPU, skipping XLA's backend optimisations cuts its compile ~4x.
    options = _CHEAP_CPU_COMPILE if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)()


# --------------------------------------------------------------------------- config

# Fields a resumed run must share with the run that wrote the workdir's checkpoints; the
# others (steps, cadences, patience, input threads, data_dir, ...) may change on resume.
RESUME_FIELDS = (
  "seed",
  "model",
  "data.val_fraction",
  "data.split_seed",
  "train.batch_size",
  "train.freeze",  # the optimizer state's structure
)

# The dataset a run's labels come from: its reader, class list and label policies (absent
# from the config of a run written before them, which read NIH).
DATA_RESUME_FIELDS = ("data.source", "data.classes", *(f"data.{p}" for p in pipeline.POLICIES))


def validate_config(config: ml_collections.ConfigDict) -> mil.ModelSpec:
  """Raises ConfigError naming the field, before any data is read or anything compiles."""
  configuration.check_finite(config)
  spec = registry.validate(config.model)
  t, d = config.train, config.data
  try:
    for field in ("batch_size", "eval_batch_size"):
      sharding.check_batch_sizes(int(t[field]), f"train.{field}")
      if int(t[field]) % jax.process_count():
        raise ConfigError(f"config train.{field}={t[field]} must divide over the processes")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  lr, wd = float(t.learning_rate), float(t.weight_decay)
  if not (math.isfinite(lr) and lr > 0):
    raise ConfigError(f"config train.learning_rate must be finite and > 0, got {lr}")
  if not (math.isfinite(wd) and wd >= 0):
    raise ConfigError(f"config train.weight_decay must be finite and >= 0, got {wd}")
  if int(t.num_steps) < 0 or int(t.num_epochs) < 0 or int(t.num_steps) == int(t.num_epochs) == 0:
    raise ConfigError("config: set train.num_steps > 0 or train.num_epochs > 0")
  initialization.check_freeze(str(t.get("freeze", "none")))
  if int(t.eval_every_epochs) < 1:
    raise ConfigError(f"config train.eval_every_epochs must be >= 1, got {t.eval_every_epochs}")
  for field in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
    if int(t[field]) < 0:
      raise ConfigError(f"config train.{field} must be >= 0, got {t[field]}")
  if not 0.0 < float(d.val_fraction) < 1.0:
    raise ConfigError(
      f"config data.val_fraction must lie in (0, 1) (the patient-wise validation share of "
      f"train_val, Sec 4.1), got {d.val_fraction}"
    )
  if int(d.synth_patients) < 0:
    raise ConfigError(f"config data.synth_patients must be >= 0, got {d.synth_patients}")
  check_data_options(d)
  return spec


def check_data_options(data: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for an unknown `data.source` or label policy, naming the field."""
  source = str(data.get("source") or "nih")
  if source not in sources.READERS:
    known = ', '.join(sources.READERS)
    raise ConfigError(f"config data.source={source!r}: expected one of {known}")
  try:
    index.Options(**{p: data[p] for p in pipeline.POLICIES if data.get(p) is not None})
  except DataError as e:
    raise ConfigError(f"config data.{e}") from None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """The `RESUME_FIELDS` (flattened: 'model.r0', ...) in which `config` differs from the
  `saved` config.json of a workdir, as 'field: saved -> new' lines."""
  old, new = _flat(saved), _flat(json.loads(config.to_json_best_effort()))
  if "model.arch" in new and "model.arch" not in old:  # written before the field existed
    old["model.arch"] = "mil"
  if "train.freeze" in new and "train.freeze" not in old:  # likewise
    old["train.freeze"] = "none"
  keys = sorted(set(old) | set(new))
  fields = (*RESUME_FIELDS, *DATA_RESUME_FIELDS)
  # The classes are compared once training has read them from the source (`setup`).
  unread = () if new.get("data.classes") else ("data.classes", "model.num_classes")
  wanted = [k for k in keys if any(k == f or k.startswith(f + ".") for f in fields)
            and (k in old or k not in DATA_RESUME_FIELDS)  # a run from before: NIH
            and k not in unread]
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in wanted if old.get(k) != new.get(k)]


def check_resume_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir whose checkpoints were written with another model, seed,
  split or batch size (before anything in the workdir is touched). Each step's own saved
  config is compared too: config.json may be edited, deleted, or not match a step folder
  copied in from another run."""
  path = workdir / CONFIG_FILE
  if not checkpointing.checkpoint_dir(workdir).exists():
    return
  advice = ". Use a new --workdir, or the workdir's own config."
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise ConfigError(f"{path}: unreadable config of the run to resume ({e})") from None
    diff = config_differences(saved, config)
    if diff:
      raise ConfigError(
        f"{workdir} holds checkpoints of a run with another config; it differs in "
        + "; ".join(diff)
        + advice
      )
  for step, saved in sorted(checkpointing.step_configs(workdir).items(), reverse=True):
    diff = config_differences(saved, config)
    if diff:
      raise ConfigError(
        f"{checkpointing.checkpoint_dir(workdir) / str(step)}: checkpoint step {step} was "
        "saved with another config; it differs in " + "; ".join(diff) + advice
      )


def resolve_data_dir(config, workdir: epath.Path, data_dir: str | None) -> str:
  """--data-dir, else config.data.data_dir, else (config.data.synth_patients > 0) a
  synthetic dataset written into W/data once."""
  data_dir = data_dir or config.data.data_dir
  if data_dir:
    data_dir = fileio.resolve(data_dir)
    nih.require_local(data_dir)
    return data_dir
  patients = int(config.data.synth_patients)
  if patients <= 0:
    raise DataError(
      "no dataset: pass --data-dir (a `lsemil prepare` output, a `lsemil synth` folder or a "
      "raw NIH ChestX-ray14 folder) or set --config.data.data_dir"
    )
  from lsemil.data import layouts, phantoms

  source = str(config.data.get("source") or "nih")
  out = workdir / ("data" if source == "nih" else f"data_{source}")
  if fileio.is_remote(out):
    out = epath.Path(
      fileio.resolve(os.path.join(tempfile.gettempdir(), "lsemil_synth", f"{source}_{patients}p"))
    )
  if not (out / nih.MARKER_NAME).exists():
    if jax.process_index() == 0:
      log.info(f"no --data-dir: synthesizing {patients} {source} patients into {out} "
               "(data.synth_patients)")
      if source == "nih":
        phantoms.synthesize(out, patients=patients, size=nih.PREPARED_SIZE, seed=0, workers=1)
      else:  # the source's own layout (`lsemil synth --layout`)
        layouts.write(source, out, patients=patients, size=nih.PREPARED_SIZE, seed=0)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("lsemil_synth_data")
  return str(out)


def resolve_classes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Writes the source's class names into `data.classes` and their number into
  `model.num_classes` (both saved with every checkpoint: `findings.of_config` reads them).

  The class list is data: a config that names other classes, or a `model.num_classes` other
  than the source's and than paper.py's default (which no config sets by hand), raises
  ConfigError.
  """
  data_dir = config.data.data_dir
  opts = pipeline.options_of(config)
  classes = tuple(pipeline.open_source(data_dir, "train", **opts).classes)
  given = tuple(config.data.get("classes") or ())
  where = f"source {opts['source']} at {data_dir}"
  if given and given != classes:
    raise ConfigError(f"config data.classes {list(given)} differ from the classes of the {where}: "
                      f"{list(classes)}; leave data.classes empty, training sets it")
  num = int(config.model.num_classes)
  if num not in (len(classes), configuration.load_config("paper").model.num_classes):
    raise ConfigError(f"config model.num_classes={num}, but the {where} has {len(classes)} "
                      "classes; model.num_classes follows from the source, do not set it")
  config.data.classes = classes
  config.model.num_classes = len(classes)
  return classes


def masked_loss(config) -> bool:
  """Whether a run's labels may be unknown (NaN): every source but NIH, whose loss stays
  the paper's `objective.binary_cross_entropy` bit for bit."""
  return pipeline.options_of(config)["source"] != "nih"


# --------------------------------------------------------------------------- validation


def state_variables(state: TrainState) -> dict:
  """The model variables of a train state ({'params', 'batch_stats'?})."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def validate(
  predictor: engine.Predictor, config, data_dir: str, split: str = "valid"
) -> tuple[dict[str, Any], engine.SplitPredictions]:
  """Per-class AUC, mean AUC (over classes with an AUC) and the BCE (Sec 3.6) on a split,
  through the one inference path; also returns the per-image predictions. With unknown
  labels (`masked_loss`) a class's AUC and BCE use the images where it is known."""
  rows = pipeline.split_rows(config, data_dir, split)
  preds = engine.collect(
    engine.predict_split(predictor, config, data_dir, split), rows, f"{data_dir} {split}"
  )
  labels, probs = preds.labels.astype(np.float64), preds.probs.astype(np.float64)
  if masked_loss(config):  # each class over the images where it is known
    known = ~np.isnan(labels)
    aucs = np.array([classification.roc_auc(labels[known[:, k], k], probs[known[:, k], k])
                     for k in range(labels.shape[1])])
    bce = objective.masked_binary_cross_entropy
  else:
    aucs = classification.per_class_auc(labels, probs)
    bce = objective.binary_cross_entropy
  mean, missing = classification.mean_auc(aucs)
  loss = bce(jnp.asarray(preds.probs), jnp.asarray(preds.labels))
  return {
    "val_mean_auc": mean,
    "val_per_class_auc": [None if math.isnan(a) else float(a) for a in aucs],
    "val_missing_classes": missing,
    "val_loss": float(loss),
    "val_examples": int(len(preds.rows)),
  }, preds


# --------------------------------------------------------------------------- early stopping


def early_stopping_update(
  meta: dict, step: int, auc: float | None, *, patience: int, last_step: bool = False
) -> dict:
  """Early stopping on the validation mean AUC (Sec 4.2), as a pure update of `meta`.

  `auc` None (undefined) never improves. After `patience` evaluations in a row without a
  new best (patience <= 0: never), `stopped_early` becomes True, unless this was the
  last step anyway. Returns the changed fields.
  """
  best = meta["best_val_mean_auc"]
  if auc is not None and (best is None or auc > best):
    out = {"best_step": step, "best_val_mean_auc": auc, "evals_since_best": 0}
  else:
    out = {"evals_since_best": int(meta["evals_since_best"]) + 1}
  out["stopped_early"] = bool(
    patience > 0 and out["evals_since_best"] >= patience and not last_step
  )
  return out


def _class_names(config) -> list[str]:
  return [c.replace(" ", "_") for c in findings.of_config(config)]


def _finite(x) -> float | None:
  x = float(x) if x is not None else float("nan")
  return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- stop requests


class StopRequests:
  """SIGTERM / SIGINT as a flag read at step boundaries (single process), so a preempted
  or interrupted run saves a checkpoint of the step it finished and exits (`Interrupted`).

  A second SIGINT raises KeyboardInterrupt at once. Multi-process runs leave SIGTERM to jax's
  preemption sync manager (the orbax `PreemptionCheckpointingPolicy` of
  `checkpointing.create_manager` saves at the step every process agrees on) and keep
  Python's SIGINT.
  """

  def __init__(self) -> None:
    self.signal: str | None = None
    self._old: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    log.warning(f"{self.signal} received: saving a checkpoint at the next step boundary")

  def __enter__(self) -> StopRequests:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  """What a training run is made of, resolved once (`setup`)."""

  config: ml_collections.ConfigDict
  workdir: epath.Path
  data_dir: str
  steps_per_epoch: int
  num_steps: int
  eval_every: int
  mesh: jax.sharding.Mesh
  model: mil.MultiResolutionMIL
  tx: optax.GradientTransformation
  abstract: TrainState
  state_sharding: Any
  is_main: bool
  progress: log.Progress | None = None  # told of each step as 'train'

  @property
  def log_every(self) -> int:
    return max(1, int(self.config.train.log_every_steps))


def setup(
  config, workdir: epath.Path, data_dir: str | None, progress: log.Progress | None = None
) -> Run:
  """Checks a resume's config, resolves the data, builds mesh, model and optimizer."""
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy we may resolve
  check_resume_config(workdir, config)  # before the data is read; the classes once read:
  is_main = jax.process_index() == 0
  config.data.data_dir = resolve_data_dir(config, workdir, data_dir)
  resolve_classes(config)
  check_resume_config(workdir, config)
  t = config.train
  steps_per_epoch = pipeline.steps_per_epoch(config.data.data_dir, config)
  mesh = sharding.create_mesh()
  model = registry.from_config(config.model)
  tx = create_optimizer(config)
  abstract, state_sh = state_sharding_for(config, model, tx, mesh)
  return Run(
    config=config,
    workdir=workdir,
    data_dir=config.data.data_dir,
    steps_per_epoch=steps_per_epoch,
    num_steps=int(t.num_steps) or int(t.num_epochs) * steps_per_epoch,
    eval_every=int(t.eval_every_steps) or int(t.eval_every_epochs) * steps_per_epoch,
    mesh=mesh,
    model=model,
    tx=tx,
    abstract=abstract,
    state_sharding=state_sh,
    is_main=is_main,
    progress=progress,
  )


def restore_or_init(run: Run, manager, train_iter) -> tuple[TrainState, dict]:
  """The workdir's own latest checkpoint (exact next batch; `train.init_from` is then not
  applied, so a preempted fine-tuning run continues), else `train.init_from` (another model's
  backbone and the head rows of shared classes, `initialization.initialize`; fresh optimizer),
  else from scratch."""
  meta = {"num_steps": run.num_steps, "best_step": None, "best_val_mean_auc": None}
  meta.update(evals_since_best=0, stopped_early=False, last_eval=None)
  abstract_sh = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    run.abstract,
    run.state_sharding,
  )
  restored = checkpointing.restore_latest(manager, abstract_sh, train_iter)  # skips damaged
  init_from = run.config.train.init_from
  if restored is not None:
    latest, state, saved = restored
    meta.update({k: v for k, v in saved.items() if k != "num_steps"})
    log.info(
      f"resuming from {checkpointing.checkpoint_dir(run.workdir) / str(latest)} (step {latest})"
      + (f"; train.init_from={init_from} not applied (the run continues)" if init_from else "")
    )
    return state, meta
  state = init_state(run.config, run.model, run.tx, run.mesh, run.state_sharding)
  if init_from:
    from jax.experimental import multihost_utils

    fresh = multihost_utils.process_allgather(state_variables(state), tiled=True)
    variables, _ = initialization.initialize(init_from, fresh, run.config)
    state = state.replace(
      params=jax.device_put(variables["params"], run.state_sharding.params),
      batch_stats=jax.device_put(variables.get("batch_stats", {}), run.state_sharding.batch_stats),
    )
  else:
    log.info("training from scratch")
    if run.config.train.get("freeze", "none") == "backbone":
      log.warning("train.freeze=backbone without train.init_from: the backbone stays random")
  return state, meta


ROWS_LOG_ENV = "LSEMIL_TRAIN_ROWS_LOG"  # "1": W/train_rows.<process>.jsonl, for tests


def _rows_log(run: Run) -> epath.Path | None:
  """When ROWS_LOG_ENV is "1", the file to which each step appends what it trains on (this
  process's part) as a JSON line {step, rows, sums}: the index rows, and each augmented
  image's pixel sum, so a test sees a repeated, lost or differently augmented example."""
  if os.environ.get(ROWS_LOG_ENV) != "1":
    return None
  return run.workdir / f"train_rows.{jax.process_index()}.jsonl"


def _log_rows(path: epath.Path, step: int, local: dict) -> None:
  sums = np.asarray(local["image"], np.int64).reshape(len(local["row"]), -1).sum(1)
  with path.open("a") as f:
    f.write(json.dumps({"step": step, "rows": local["row"].tolist(), "sums": sums.tolist()}))
    f.write("\n")


class MetricWindow:
  """Step metrics fetched in batches (no per-step host sync): their mean is logged, a
  non-finite loss stops the run naming the step, and images/s is measured between flushes."""

  def __init__(self, run: Run, writer) -> None:
    self.run, self.writer = run, writer
    self.pending: list[tuple[int, dict]] = []
    self.last_saved: int | None = None
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def add(self, step: int, step_metrics: dict) -> None:
    self.pending.append((step, step_metrics))
    self.steps += 1

  def flush(self, step: int) -> None:
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending.clear()
    for s, m in zip(steps, fetched, strict=True):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
        good = "none" if self.last_saved is None else f"step {self.last_saved}"
        raise NonFiniteLossError(
          f"non-finite loss ({float(m['loss'])}) or parameters at step {s}; stopping. "
          f"Last good checkpoint: {good} in {checkpointing.checkpoint_dir(self.run.workdir)}"
        )
    dt = time.perf_counter() - self.start
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    mean["images_per_s"] = self.steps * int(self.run.config.train.batch_size) / max(dt, 1e-9)
    mean["epoch"] = step / self.run.steps_per_epoch
    self.writer.write(step, mean, kind="train")
    if self.run.progress:
      status = f"loss={mean['loss']:.4f}, img_s={mean['images_per_s']:.1f}"
      self.run.progress("train", step, self.run.num_steps, status)
    self.restart()


class Validator:
  """Validation during training through the one inference path (`engine.Predictor`,
  compiled once), writing W/validation_predictions.csv (the latest evaluation, per image)."""

  def __init__(self, run: Run, state: TrainState) -> None:
    self.run = run
    self.predictor = engine.Predictor(run.model, state_variables(state), run.mesh)
    self._index = None

  def __call__(self, state: TrainState, step: int, meta: dict, writer) -> dict:
    run = self.run
    self.predictor.variables = state_variables(state)
    eval_metrics, preds = validate(self.predictor, run.config, run.data_dir)
    auc = _finite(eval_metrics["val_mean_auc"])
    meta.update(
      early_stopping_update(
        meta, step, auc, patience=int(run.config.train.patience), last_step=step == run.num_steps
      )
    )
    meta["last_eval"] = {"step": step, **fileio.json_safe(eval_metrics)}
    per_class = dict(zip(_class_names(run.config), eval_metrics["val_per_class_auc"], strict=True))
    writer.write(
      step,
      {
        **eval_metrics,
        "best_val_mean_auc": meta["best_val_mean_auc"],
        **{f"auc_{name}": a for name, a in per_class.items()},
      },
      kind="eval",
    )
    if run.is_main:
      if self._index is None:
        self._index = pipeline.open_index(run.data_dir, **pipeline.options_of(run.config))
      engine.write_split_predictions(run.workdir / VALIDATION_PREDICTIONS, self._index, preds)
    auc_s = "n/a" if auc is None else f"{auc:.4f}"
    log.info(f"step {step}: val mean AUC {auc_s}, val loss {eval_metrics['val_loss']:.4f}")
    if meta["stopped_early"]:
      log.info(
        f"early stopping at step {step}: no improvement in {run.config.train.patience} evaluations"
      )
    return eval_metrics


def train_loop(run: Run, state, meta, manager, train_iter, writer, stops) -> TrainState:
  """Steps from the state's step to `run.num_steps`: log, validate, checkpoint; stops early
  (Sec 4.2) or on a stop request after saving (raises `Interrupted`)."""
  start = int(jax.device_get(state.step))
  frozen = run.config.train.get("freeze", "none") == "backbone"
  p_train_step = make_train_step(
    run.model, run.tx, run.mesh, run.state_sharding, frozen_backbone=frozen,
    masked=masked_loss(run.config),
  )
  batch_sh = sharding.batch_sharding(run.mesh)
  validator = Validator(run, state)
  window = MetricWindow(run, writer)
  window.last_saved = manager.latest_step()
  rows_log = _rows_log(run)
  for step in range(start + 1, run.num_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      local = next(train_iter)
      if rows_log is not None:
        _log_rows(rows_log, step, local)
      batch = sharding.global_batch(
        {"image": np.asarray(local["image"]), "labels": np.asarray(local["labels"])}, batch_sh
      )
      state, step_metrics = p_train_step(state, batch)
    window.add(step, step_metrics)
    if step == start + 1:
      jax.block_until_ready(state)
      logging.info("first step (compile) took %.1fs", time.perf_counter() - window.start)
    if run.progress:
      run.progress("train", step, run.num_steps)
    is_eval = step % run.eval_every == 0 or step == run.num_steps
    stop = stops.signal is not None
    save = is_eval or manager.should_save(step) or stop  # should_save: every process, every step
    if step % run.log_every == 0 or save:
      window.flush(step)
    eval_metrics = validator(state, step, meta, writer) if is_eval else None
    if save or meta["stopped_early"]:
      meta["step"], meta["epoch"] = step, step / run.steps_per_epoch
      metric = None if eval_metrics is None else _finite(eval_metrics["val_mean_auc"])
      checkpointing.save(
        manager,
        step,
        state,
        train_iter,
        config=run.config,
        meta=meta,
        metrics=None if eval_metrics is None else {checkpointing.BEST_METRIC: metric},
      )
      window.last_saved = step
      writer.flush()
    if stop or manager.reached_preemption(step):
      manager.wait_until_finished()
      why = stops.signal or "a preemption notice"
      raise Interrupted(
        f"stopped by {why} after saving step {step} in "
        f"{checkpointing.checkpoint_dir(run.workdir)}; rerun the same command to resume"
      )
    if is_eval or save:  # keep evaluation and saving out of the images/s window
      window.restart()
    if meta["stopped_early"]:
      break
  return state


def _result(run: Run, manager, meta: dict) -> dict[str, Any]:
  workdir = run.workdir
  best = checkpointing.best_step(manager)
  best_auc = None
  if best is not None:
    best_auc = _finite(manager.metrics(best).get(checkpointing.BEST_METRIC))
  return {
    "best_step": best,
    "best_val_mean_auc": best_auc,
    "best_checkpoint": str(checkpointing.checkpoint_dir(workdir) / str(best))
    if best is not None
    else None,
    "last_step": manager.latest_step(),
    "num_steps": meta["num_steps"],
    "stopped_early": bool(meta["stopped_early"]),
    "workdir": str(workdir),
    "checkpoint_dir": str(checkpointing.checkpoint_dir(workdir)),
    "metrics_file": str(workdir / metric_writer.METRICS_FILE),
    "config_file": str(workdir / CONFIG_FILE),
    "data_dir": run.data_dir,
  }


def final_line(result: dict) -> str:
  """The one-line outcome of a run (`lsemil train` prints it)."""
  if result["best_step"] is None:
    return f"no evaluated checkpoint in {result['checkpoint_dir']}"
  auc = result["best_val_mean_auc"]
  auc_s = "n/a" if auc is None else f"{auc:.4f}"
  return (
    f"best checkpoint: {result['best_checkpoint']} (step {result['best_step']}), "
    f"validation mean AUC {auc_s}"
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  data_dir: str | None = None,
  progress: log.Progress | None = None,
) -> dict[str, Any]:
  """Trains `config` into `workdir` (resuming from its latest checkpoint) and validates.

  setup -> lock the workdir -> restore or init -> loop (log / validate / checkpoint) -> result.
  A workdir that already finished (last step reached or stopped early) is left as it is and
  its best checkpoint reported. Returns dict(best_step, best_val_mean_auc, best_checkpoint,
  last_step, num_steps, stopped_early, workdir, checkpoint_dir, metrics_file, config_file,
  data_dir), also written to W/result.json. Raises ConfigError / DataError before compiling,
  NonFiniteLossError, and Interrupted after saving on SIGTERM / SIGINT. Notes go to
  `lsemil.core.log`; `progress` is told of each step as 'train' (loss and images/s as its
  status), on every process.
  """
  validate_config(config)
  workdir = epath.Path(fileio.resolve(workdir))
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
    run = setup(config, workdir, data_dir, progress)
    t = run.config.train
    manager = checkpointing.create_manager(
      run.workdir,
      keep=int(t.keep_checkpoints),
      save_every_steps=int(t.checkpoint_every_steps),
      async_save=bool(t.async_checkpoints),
    )
    train_iter = pipeline.make_train_iter(
      run.config,
      run.data_dir,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    try:
      state, meta = restore_or_init(run, manager, train_iter)
      start = int(jax.device_get(state.step))
      if start >= run.num_steps or meta["stopped_early"]:
        why = "stopped early" if meta["stopped_early"] else f"reached step {start}"
        log.info(f"{run.workdir}: already finished ({why}); nothing to do")
      else:
        if run.is_main:
          fileio.write_text(
            run.workdir / CONFIG_FILE, run.config.to_json_best_effort(indent=2) + "\n"
          )
        writer = metric_writer.MetricWriter(run.workdir, enabled=run.is_main, resume_step=start)
        if start == 0:
          writer.write_text("config", run.config.to_json_best_effort(indent=2))
        if progress:
          progress("train", start, run.num_steps)
        logging.info(
          "training steps %d..%d: %d steps/epoch, eval every %d, %d processes, %d devices",
          start + 1,
          run.num_steps,
          run.steps_per_epoch,
          run.eval_every,
          jax.process_count(),
          jax.device_count(),
        )
        try:
          with StopRequests() as stops, jax.set_mesh(run.mesh):
            train_loop(run, state, meta, manager, train_iter, writer, stops)
        finally:
          writer.close()
      manager.wait_until_finished()
      result = _result(run, manager, meta)
    finally:
      manager.wait_until_finished()
      manager.close()
  if run.is_main:
    fileio.write_json(run.workdir / "result.json", result, indent=2)
  return result
