"""Training and validation of the multi-resolution MIL model (paper Sec 4.2).

The paper trains with Adam (lr 1e-3, weight decay 1e-5) on the multi-label BCE of the
pooled probabilities (Sec 3.6), with the Sec 4.2 augmentation, validates on a patient-wise
held-out part of train_val, stops early on the validation mean AUC, and keeps the best
model. `train_and_evaluate(config, workdir)` does exactly that:

  mesh -> data -> model/state -> jitted steps -> restore -> loop (log / eval / checkpoint)

- `TrainState`: params, batch_stats ({} with GroupNorm), optimizer state, step, rng
  (raw uint32 key data, so orbax stores it as a plain array).
- `train_step` / `eval_step` are pure module-level functions, compiled once each by
  `make_train_step` / `make_eval_step` with `jax.jit` and explicit shardings on the
  ('data', 'model') mesh of lsemil.sharding: batch over 'data', state replicated or
  FSDP-sharded (`config.train.fsdp`). BatchNorm statistics are over the global batch
  (jit, no axis_name). The same code runs on one device, many, or many hosts.
- Mixed precision: `config.model.dtype='bfloat16'` computes in bf16; params, Adam moments
  and the loss stay float32.
- Validation every `eval_every_epochs` epochs (or `eval_every_steps`): per-class and mean
  AUC on the valid split; early stopping after `patience` evaluations without improvement;
  orbax keeps the last `keep_checkpoints` plus the best by validation mean AUC
  (lsemil.checkpointing).
- A non-finite loss (or parameter norm) stops the run with `NonFiniteLossError` naming the
  step; nothing after the last good checkpoint is saved.
"""

from __future__ import annotations

import functools
import json
import math
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

from lsemil import checkpointing, losses, metrics, sharding, tb_writer
from lsemil import model as model_lib

CONFIG_FILE = "config.json"
_CHEAP_CPU_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}
SMOKE_PATIENTS = 40


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the message names the step and the last checkpoint."""


class TrainState(struct.PyTreeNode):
  """Everything a train step reads and writes (a pytree; checkpointed by orbax)."""

  step: jax.Array  # int32 scalar: completed steps
  params: Any
  batch_stats: Any  # {} when config.model.norm == 'group'
  opt_state: Any
  rng: jax.Array  # uint32 key data of the run's base key; steps fold in the step number


# --------------------------------------------------------------------------- state & steps


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The paper's optimizer (Sec 4.2): Adam with coupled L2 weight decay."""
  return losses.paper_optimizer(float(config.train.learning_rate), float(config.train.weight_decay))


def create_train_state(
  *, model: model_lib.MultiResolutionMIL, tx: optax.GradientTransformation, seed: int
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


def _sharpness(model: model_lib.MultiResolutionMIL, params: Any) -> jax.Array | None:
  """Mean LSE-LBA sharpness r = r0 + exp(beta) (Eq. 4), logged as a training metric."""
  beta = params.get("pool", {}).get("beta") if model.pooling == "lse_lba" else None
  if beta is None:
    return None
  return jnp.mean(model.r0 + jnp.exp(beta))


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  model: model_lib.MultiResolutionMIL,
  tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on the BCE of the pooled probabilities (Sec 3.6, 4.2). Pure.

  `batch`: image (B, S, S, 1) uint8 (or float32 in [0, 1]), labels (B, K) float32. Returns the new
  state and float32 scalars: loss, grad_norm, param_norm (after the update), r (LSE-LBA).
  """
  use_bn = bool(state.batch_stats)

  def loss_fn(params):
    variables = {"params": params}
    if use_bn:
      variables["batch_stats"] = state.batch_stats
      out, updates = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
      new_stats = updates["batch_stats"]
    else:
      out, new_stats = model.apply(variables, batch["image"], train=True), state.batch_stats
    loss = losses.binary_cross_entropy(out["probs"], batch["labels"])
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


def eval_step(
  state: TrainState, batch: dict[str, jax.Array], *, model: model_lib.MultiResolutionMIL
) -> dict[str, jax.Array]:
  """Class probabilities of a (padded) eval batch, passed back with its labels and mask."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  out = model.apply(variables, batch["image"], train=False)
  return {"probs": out["probs"], "labels": batch["labels"], "mask": batch["mask"]}


def make_train_step(model, tx, mesh: jax.sharding.Mesh, state_sharding: Any):
  """`train_step` jitted: state in/out with `state_sharding`, batch over 'data', state donated."""
  return jax.jit(
    functools.partial(train_step, model=model, tx=tx),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def make_eval_step(model, mesh: jax.sharding.Mesh, state_sharding: Any):
  """`eval_step` jitted: outputs replicated, so every process reads all predictions."""
  return jax.jit(
    functools.partial(eval_step, model=model),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def make_predict_fn(model: model_lib.MultiResolutionMIL):
  """jitted fn(variables, images (B, S, S, 1) float32) -> dict(probs, saliency, saliency_levels).

  `variables` = {'params', 'batch_stats'?} as returned by checkpointing.load_inference.
  """

  def predict(variables, images):
    return model.apply(variables, images, train=False)

  return jax.jit(predict)


def abstract_state(model, tx, seed: int) -> TrainState:
  return jax.eval_shape(functools.partial(create_train_state, model=model, tx=tx, seed=seed))


def state_sharding_for(config, model, tx, mesh) -> tuple[TrainState, Any]:
  """(abstract state, its shardings) for `config.train.fsdp` on `mesh`."""
  abstract = abstract_state(model, tx, int(config.seed))
  shardings = sharding.state_shardings(
    abstract,
    mesh,
    fsdp=bool(config.train.fsdp),
    min_size=int(config.train.get("fsdp_min_size", 2**18)),
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


def validate_config(config: ml_collections.ConfigDict) -> model_lib.ModelSpec:
  """Raises ValueError for a bad config, before any data is read or anything compiles."""
  spec = model_lib.validate(config.model)
  t = config.train
  for field in ("batch_size", "eval_batch_size"):
    sharding.check_batch_sizes(int(t[field]), f"train.{field}")
    if int(t[field]) % jax.process_count():
      raise ValueError(f"config train.{field}={t[field]} must divide over the processes")
  lr, wd = float(t.learning_rate), float(t.weight_decay)
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"config train.learning_rate must be finite and > 0, got {lr}")
  if not (math.isfinite(wd) and wd >= 0):
    raise ValueError(f"config train.weight_decay must be finite and >= 0, got {wd}")
  if int(t.num_steps) < 0 or int(t.num_epochs) < 0 or int(t.num_steps) == int(t.num_epochs) == 0:
    raise ValueError("config: set train.num_steps > 0 or train.num_epochs > 0")
  if int(t.eval_every_epochs) < 1:
    raise ValueError(f"config train.eval_every_epochs must be >= 1, got {t.eval_every_epochs}")
  for field in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
    if int(t[field]) < 0:
      raise ValueError(f"config train.{field} must be >= 0, got {t[field]}")
  return spec


def _resolve_data_dir(config, workdir: epath.Path, data_dir, note) -> str:
  """--data-dir, else config.data.data_dir, else (smoke config only) synthesize W/data."""
  data_dir = data_dir or config.data.get("data_dir", "")
  if data_dir:
    return str(data_dir)
  if config.get("name") != "smoke":
    raise ValueError(
      "no dataset: pass --data-dir (a `lsemil prepare` output, a `lsemil synth` folder or a "
      "raw NIH ChestX-ray14 folder) or set --config.data.data_dir"
    )
  from lsemil.data import synth

  out = workdir / "data"
  if not (out / "lsemil_dataset.json").exists():
    if jax.process_index() == 0:
      note(f"no --data-dir: synthesizing {SMOKE_PATIENTS} patients into {out} (smoke config)")
      synth.synthesize(out, patients=SMOKE_PATIENTS, size=512, seed=0, workers=1)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("lsemil_smoke_data")
  return str(out)


# --------------------------------------------------------------------------- evaluation


def evaluate(
  p_eval_step, state: TrainState, config, data_dir: str, mesh, split: str = "valid"
) -> dict[str, Any]:
  """Per-class AUC, mean AUC (over classes with an AUC) and BCE loss on a split."""
  from lsemil.data import pipeline

  it = pipeline.make_eval_iter(
    config,
    data_dir,
    split,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  batch_sh = sharding.batch_sharding(mesh)
  probs, labels = [], []
  for batch in it:
    local = {k: np.asarray(batch[k]) for k in ("image", "labels", "mask")}
    out = sharding.to_host(p_eval_step(state, sharding.global_batch(local, batch_sh)))
    keep = out["mask"].astype(bool)
    probs.append(out["probs"][keep])
    labels.append(out["labels"][keep])
  p = np.concatenate(probs).astype(np.float64)
  y = np.concatenate(labels).astype(np.float64)
  aucs = metrics.per_class_auc(y, p)
  mean, missing = metrics.mean_auc(aucs)
  pc = np.clip(p, losses.PROB_EPS, 1 - losses.PROB_EPS)
  loss = float(np.mean(-np.sum(y * np.log(pc) + (1 - y) * np.log1p(-pc), axis=-1)))
  return {
    "val_mean_auc": mean,
    "val_per_class_auc": [None if math.isnan(a) else float(a) for a in aucs],
    "val_missing_classes": missing,
    "val_loss": loss,
    "val_examples": int(len(y)),
  }


# --------------------------------------------------------------------------- the loop


def early_stopping_update(
  meta: dict, step: int, auc: float | None, *, patience: int, last_step: bool = False
) -> dict:
  """Early stopping on the validation mean AUC (Sec 4.2), as a pure update of `meta`.

  `auc` None (undefined) never improves. After `patience` evaluations in a row without a
  new best (patience <= 0: never), `stopped_early` becomes True, unless this was the
  last step anyway. Returns the changed fields.
  """
  best = meta.get("best_val_mean_auc")
  if auc is not None and (best is None or auc > best):
    out = {"best_step": step, "best_val_mean_auc": auc, "evals_since_best": 0}
  else:
    out = {"evals_since_best": int(meta.get("evals_since_best", 0)) + 1}
  out["stopped_early"] = bool(
    patience > 0 and out["evals_since_best"] >= patience and not last_step
  )
  return out


def _class_names(model) -> list[str]:
  from lsemil.data import nih

  if model.num_classes == len(nih.CLASSES):
    return [c.replace(" ", "_") for c in nih.CLASSES]
  return [f"class{k}" for k in range(model.num_classes)]


def _finite(x) -> float | None:
  x = float(x) if x is not None else float("nan")
  return x if math.isfinite(x) else None


def _result(workdir: epath.Path, manager, meta: dict, data_dir: str) -> dict[str, Any]:
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
    "num_steps": meta.get("num_steps"),
    "stopped_early": bool(meta.get("stopped_early", False)),
    "workdir": str(workdir),
    "checkpoint_dir": str(checkpointing.checkpoint_dir(workdir)),
    "metrics_file": str(workdir / tb_writer.METRICS_FILE),
    "config_file": str(workdir / CONFIG_FILE),
    "data_dir": data_dir,
  }


def _final_line(result: dict) -> str:
  if result["best_step"] is None:
    return f"no evaluated checkpoint in {result['checkpoint_dir']}"
  auc = result["best_val_mean_auc"]
  auc_s = "n/a" if auc is None else f"{auc:.4f}"
  return (
    f"best checkpoint: {result['best_checkpoint']} (step {result['best_step']}), "
    f"validation mean AUC {auc_s}"
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, data_dir: str | None = None
) -> dict[str, Any]:
  """Trains `config` into `workdir` (resuming from its latest checkpoint) and validates.

  Resume order: the workdir's own latest checkpoint (exact next batch), else
  `config.train.init_from` (weights of an earlier lsemil run, best checkpoint), else
  from scratch. A workdir that already finished (last step reached or stopped early)
  is left as it is and its best checkpoint reported.

  Returns dict(best_step, best_val_mean_auc, best_checkpoint, last_step, num_steps,
  stopped_early, workdir, checkpoint_dir, metrics_file, config_file, data_dir).
  Raises ValueError for config errors (before compiling) and NonFiniteLossError.
  """
  from tqdm.auto import tqdm

  from lsemil.data import pipeline

  is_main = jax.process_index() == 0
  bar = None

  def note(msg: str) -> None:
    logging.info("%s", msg)
    if is_main:
      (bar.write if bar is not None else print)(msg)

  # ---- config, workdir, data
  validate_config(config)
  config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy we may resolve
  workdir = epath.Path(workdir)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  data_dir = _resolve_data_dir(config, workdir, data_dir, note)
  config.data.data_dir = data_dir
  t = config.train
  steps_per_epoch = pipeline.steps_per_epoch(data_dir, config)
  num_steps = int(t.num_steps) or int(t.num_epochs) * steps_per_epoch
  eval_every = int(t.eval_every_steps) or int(t.eval_every_epochs) * steps_per_epoch
  log_every = max(1, int(t.log_every_steps))
  global_bs = int(t.batch_size)
  if is_main:
    (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")

  # ---- mesh, model, state shardings, steps
  mesh = sharding.create_mesh()
  model = model_lib.from_config(config.model)
  tx = create_optimizer(config)
  abstract, state_sh = state_sharding_for(config, model, tx, mesh)
  p_train_step = make_train_step(model, tx, mesh, state_sh)
  p_eval_step = make_eval_step(model, mesh, state_sh)
  batch_sh = sharding.batch_sharding(mesh)

  # ---- input
  train_iter = pipeline.make_train_iter(
    config, data_dir, process_index=jax.process_index(), process_count=jax.process_count()
  )

  # ---- restore: own checkpoint > init_from > scratch
  manager = checkpointing.create_manager(
    workdir,
    keep=int(t.keep_checkpoints),
    save_every_steps=int(t.checkpoint_every_steps),
    async_save=bool(t.get("async_checkpoints", True)),
  )
  meta = {"num_steps": num_steps, "best_step": None, "best_val_mean_auc": None}
  meta.update(evals_since_best=0, stopped_early=False, last_eval=None)
  latest = manager.latest_step()
  if latest is not None:
    abstract_sh = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
    )
    state, saved = checkpointing.restore(manager, latest, abstract_sh, train_iter)
    meta.update({k: v for k, v in saved.items() if k != "num_steps"})
    note(f"resuming from {checkpointing.checkpoint_dir(workdir) / str(latest)} (step {latest})")
  else:
    state = init_state(config, model, tx, mesh, state_sh)
    init_from = t.get("init_from", "")
    if init_from:
      _, _, variables, src_step, _ = checkpointing.load_inference(init_from, which="best")
      state = state.replace(
        params=jax.device_put(variables["params"], state_sh.params),
        batch_stats=jax.device_put(variables.get("batch_stats", {}), state_sh.batch_stats),
      )
      note(f"initialised weights from {init_from} (step {src_step}); optimizer from scratch")
    else:
      note("training from scratch")
  start = int(jax.device_get(state.step))

  if start >= num_steps or meta.get("stopped_early"):
    why = "stopped early" if meta.get("stopped_early") else f"reached step {start}"
    note(f"{workdir}: already finished ({why}); nothing to do")
    manager.wait_until_finished()
    result = _result(workdir, manager, meta, data_dir)
    manager.close()
    note(_final_line(result))
    return result

  # ---- loop
  writer = tb_writer.MetricWriter(workdir, enabled=is_main)
  if start == 0:
    writer.write_text("config", config.to_json_best_effort(indent=2))
  last_saved = latest
  pending: list[tuple[int, dict]] = []
  window_start, window_steps = time.perf_counter(), 0
  bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", disable=not is_main)
  logging.info(
    "training steps %d..%d: %d steps/epoch, eval every %d, %d processes, %d devices",
    start + 1,
    num_steps,
    steps_per_epoch,
    eval_every,
    jax.process_count(),
    jax.device_count(),
  )

  def flush_metrics(step: int) -> None:
    """Fetches the pending step metrics, stops on a non-finite one, logs their mean."""
    nonlocal window_start, window_steps
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending.clear()
    for s, m in zip(steps, fetched, strict=True):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
        good = "none" if last_saved is None else f"step {last_saved}"
        raise NonFiniteLossError(
          f"non-finite loss ({float(m['loss'])}) or parameters at step {s}; stopping. "
          f"Last good checkpoint: {good} in {checkpointing.checkpoint_dir(workdir)}"
        )
    dt = time.perf_counter() - window_start
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
    mean["images_per_s"] = window_steps * global_bs / max(dt, 1e-9)
    mean["epoch"] = step / steps_per_epoch
    writer.write(step, mean, kind="train")
    bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{mean['images_per_s']:.1f}")
    window_start, window_steps = time.perf_counter(), 0

  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          local = next(train_iter)
          batch = sharding.global_batch(
            {"image": np.asarray(local["image"]), "labels": np.asarray(local["labels"])},
            batch_sh,
          )
          state, step_metrics = p_train_step(state, batch)
        pending.append((step, step_metrics))
        window_steps += 1
        if step == start + 1:
          jax.block_until_ready(state)
          logging.info("first step (compile) took %.1fs", time.perf_counter() - window_start)
        bar.update(1)
        is_eval = step % eval_every == 0 or step == num_steps
        save = is_eval or manager.should_save(step)
        if step % log_every == 0 or save:
          flush_metrics(step)
        eval_metrics = None
        if is_eval:
          eval_metrics = evaluate(p_eval_step, state, config, data_dir, mesh)
          auc = _finite(eval_metrics["val_mean_auc"])
          meta.update(
            early_stopping_update(
              meta, step, auc, patience=int(t.patience), last_step=step == num_steps
            )
          )
          meta["last_eval"] = {"step": step, **tb_writer.json_safe(eval_metrics)}
          per_class = dict(zip(_class_names(model), eval_metrics["val_per_class_auc"], strict=True))
          writer.write(
            step,
            {
              **eval_metrics,
              "best_val_mean_auc": meta["best_val_mean_auc"],
              **{f"auc_{name}": a for name, a in per_class.items()},
            },
            kind="eval",
          )
          auc_s = "n/a" if auc is None else f"{auc:.4f}"
          note(f"step {step}: val mean AUC {auc_s}, val loss {eval_metrics['val_loss']:.4f}")
          if meta["stopped_early"]:
            note(f"early stopping at step {step}: no improvement in {t.patience} evaluations")
        if save or meta["stopped_early"]:
          meta["step"], meta["epoch"] = step, step / steps_per_epoch
          checkpointing.save(
            manager,
            step,
            state,
            train_iter,
            config=config,
            meta=meta,
            metrics=None
            if eval_metrics is None
            else {checkpointing.BEST_METRIC: _finite(eval_metrics["val_mean_auc"])},
          )
          last_saved = step
          writer.flush()
        if is_eval or save:  # keep evaluation and saving out of the images/s window
          window_start, window_steps = time.perf_counter(), 0
        if meta["stopped_early"]:
          break
  except BaseException:
    manager.wait_until_finished()
    manager.close()
    raise
  finally:
    bar.close()
    bar = None
    writer.close()
  manager.wait_until_finished()

  result = _result(workdir, manager, meta, data_dir)
  manager.close()
  if is_main:
    (workdir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
  note(_final_line(result))
  return result
