"""Orbax checkpoints of training runs, and the loader for inference (paper Sec 4.2).

The paper keeps the model with the best validation mean AUC (early stopping, Sec 4.2);
this is the only module that imports orbax. Layout of a workdir:

  W/checkpoints/<step>/model/       {'params', 'batch_stats'?}   (StandardSave)
  W/checkpoints/<step>/opt/         {'opt_state', 'step', 'rng'} (StandardSave)
  W/checkpoints/<step>/train_iter/  grain iterator state, one JSON file per process
  W/checkpoints/<step>/config/      the resolved config (JSON)
  W/checkpoints/<step>/meta/        progress: epoch, evaluation history, early stopping
  W/checkpoints/<step>/metrics/     {'val_mean_auc'} on evaluation steps (orbax's own)
  W/checkpoints/<step>/checksums/   crc32 per weight array, verified on every load (integrity)

Weights and optimizer state are separate items so that `load_inference` reads only the
weights. Saves are asynchronous (device -> host copy blocks, the write runs in the
background); the manager keeps the last `keep` checkpoints plus the best one by
validation mean AUC. Paths go through etils.epath, so gs:// workdirs work as local ones.

A save that fails (a full disk, any OSError, also when tensorstore reports an OS error
code) raises ONE `lsemil.core.errors.OutputError` naming the checkpoint folder, the step and the
errno text, after removing the failed step's partial folder; earlier checkpoints are not
touched. A partial save (failed, or the process killed mid-write) never counts as a
checkpoint: locally orbax writes into `<step>.orbax-checkpoint-tmp*` and renames it when
complete; on gs:// a step folder counts only once its `commit_success.txt` exists. Orbax
skips both kinds when listing steps, and a manager created for training removes them.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from lsemil.core import fileio, log
from lsemil.core.errors import CheckpointError, OutputError
from lsemil.models import mil, registry
from lsemil.runtime import integrity


def _not_read_only_notice(record) -> bool:
  # Orbax warns on every read-only manager, which is how inference opens checkpoints, and
  # on every save without metrics (only evaluation steps have them, by design).
  message = record.getMessage()
  return "is read only" not in message and "did not provide metrics" not in message


_save_failed = False  # set once a save failed with an OS error (reported as an OutputError)


def _not_reported_save_failure(record) -> bool:
  # Orbax logs a failed background save with its traceback, once per thread that sees it;
  # the failure is raised as one OutputError (`_Manager`), so those logs are dropped (only
  # those of an OS error: anything else keeps its traceback). After such a failure the
  # process closes the manager and exits while orbax's metadata thread still runs; its
  # "cannot schedule new futures after shutdown" (the manager's executor closed) or "after
  # interpreter shutdown" (the exit), whichever comes first under the host's load, is that
  # exit, not a second failure.
  exc = record.exc_info[1] if record.exc_info else None
  if exc is None:
    return _LATE_SCHEDULE not in record.getMessage() or not _save_failed
  if _save_failed and isinstance(exc, RuntimeError) and _LATE_SCHEDULE in str(exc):
    return False
  return _errno_of(exc) is None


_LATE_SCHEDULE = "cannot schedule new futures after"


logging.get_absl_logger().addFilter(_not_read_only_notice)
logging.get_absl_logger().addFilter(_not_reported_save_failure)
# The tasks of a failed save's other writes end with the same error, which nobody awaits:
# asyncio logs each as "Task exception was never retrieved" with its traceback.
std_logging.getLogger("asyncio").addFilter(_not_reported_save_failure)


def _not_other_reads_of_a_reported_step(record) -> bool:
  # The same for a damaged step's restore (`_unreadable`): its other reads' tasks end with
  # errors naming that step's folder, which asyncio logs as never retrieved.
  exc = record.exc_info[1] if record.exc_info else None
  text = str(exc) if exc is not None else record.getMessage()
  return not any(folder in text for folder in _reported_reads)


std_logging.getLogger("asyncio").addFilter(_not_other_reads_of_a_reported_step)


def _late_callback_into_a_closed_loop(exc: BaseException, tb) -> bool:
  # After a failed save, orbax's save thread has closed its event loop while tensorstore's
  # other writes of that save still finish; their completion callbacks then raise
  # "Event loop is closed" in tensorstore's threads, which print it through sys.excepthook
  # (or the unraisable hook).
  # The failure itself is raised as one OutputError, so only these are dropped.
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
    return False
  frames = traceback.extract_tb(tb)
  return bool(frames) and frames[0].name == "call_soon_threadsafe"


_reported_reads: set[str] = set()  # step folders reported unreadable (a CheckpointError)


def _other_reads_of_a_reported_step(obj) -> bool:
  # A step that fails to restore is reported once (`_unreadable`); orbax's other array reads
  # of that step end with the same error in coroutines nobody awaits any more, which Python
  # prints as "Exception ignored in: <coroutine ...>" when it collects them.
  code = getattr(obj, "cr_code", None)
  return bool(_reported_reads) and code is not None and "orbax" in code.co_filename


def _install_excepthook() -> None:
  previous = sys.excepthook

  def hook(kind, exc, tb):
    if not _late_callback_into_a_closed_loop(exc, tb):
      previous(kind, exc, tb)

  sys.excepthook = hook
  previous_unraisable = sys.unraisablehook

  def unraisable(args):
    if not _late_callback_into_a_closed_loop(args.exc_value, args.exc_traceback) and not (
      _other_reads_of_a_reported_step(args.object)
    ):
      previous_unraisable(args)

  sys.unraisablehook = unraisable


_install_excepthook()

CHECKPOINT_DIR = "checkpoints"
BEST_METRIC = "val_mean_auc"
_policies = ocp.checkpoint_managers


def _metric(metrics: Any) -> float:
  """The ranking value of a checkpoint: val mean AUC, NaN/missing ranked last."""
  value = (metrics or {}).get(BEST_METRIC)
  value = float("nan") if value is None else float(value)
  return -math.inf if math.isnan(value) else value


def checkpoint_dir(workdir: str | epath.Path) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINT_DIR


# --------------------------------------------------------------------------- write failures

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix of a step folder being written (local)
COMMIT_FILE = "commit_success.txt"  # orbax's marker of a finished step folder on gs://
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_STEP_IN_PATH = re.compile(r"/(\d+)(?:\.orbax-checkpoint-tmp[^/]*)?/")


def _errno_of(exc: BaseException) -> int | None:
  """The OS error number behind `exc` (an OSError, or tensorstore's ValueError carrying
  `os_error_code=N`), looking through its causes; None for anything else."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
      return int(exc.errno)
    if m := _OS_ERROR_CODE.search(str(exc)):
      return int(m.group(1))
    exc = exc.__cause__ or exc.__context__
  return None


def _fresh_listing(directory: epath.Path) -> None:
  """gcsfs caches listings per process, and orbax writes through tensorstore, which that
  cache never sees: forget `directory`'s listing before reading it again."""
  if not fileio.is_remote(directory):
    return
  with contextlib.suppress(ImportError, AttributeError):
    from etils.epath import backend

    backend.fsspec_backend.fs(os.fspath(directory)).invalidate_cache(os.fspath(directory))


def partial_step_dirs(directory: str | epath.Path, step: int | None = None) -> list[epath.Path]:
  """Unfinished step folders under a checkpoints folder (of `step`, or of any step)."""
  directory = epath.Path(directory)
  _fresh_listing(directory)
  if not directory.is_dir():
    return []
  out = []
  for p in directory.iterdir():
    name, _, _ = p.name.partition(TMP_MARK)
    if not name.isdigit() or (step is not None and int(name) != step):
      continue
    if TMP_MARK in p.name or (fileio.is_remote(p) and not (p / COMMIT_FILE).exists()):
      out.append(p)
  return out


def _remove_partial(directory: epath.Path, step: int | None) -> None:
  if jax.process_index() != 0:
    return
  for p in partial_step_dirs(directory, step):
    with contextlib.suppress(OSError):
      p.rmtree()


class _Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager whose write failures surface as one OutputError."""

  _reported: set[int]  # ids of the exceptions already raised as OutputError
  _failed: set[int | None]  # steps whose save failed
  _saving: int  # the step of the latest save started

  @contextlib.contextmanager
  def _as_output_error(self, step: int | None, *, again_ok: bool):
    reported = self.__dict__.setdefault("_reported", set())
    try:
      yield
    except OutputError:
      raise
    except Exception as e:
      code = _errno_of(e)
      if code is None:
        raise
      if id(e) in reported and again_ok:
        return  # already raised once (orbax re-raises a failed async save on every wait)
      reported.add(id(e))
      global _save_failed
      _save_failed = True
      m = _STEP_IN_PATH.search(str(e))
      failed = int(m.group(1)) if m else step
      if failed is None:  # an asynchronous failure: the save in flight was the latest one
        failed = self.__dict__.get("_saving")
      self.__dict__.setdefault("_failed", set()).add(failed)
      _remove_partial(self.directory, failed)  # frees the space now; again in close()
      _fresh_listing(self.directory)
      intact = ocp.step.checkpoint_steps(self.directory)  # re-read from storage
      what = "a checkpoint" if failed is None else f"checkpoint step {failed}"
      kept = f"latest intact checkpoint: step {max(intact)}" if intact else "no checkpoint yet"
      raise OutputError(
        f"{self.directory}: cannot save {what}: {os.strerror(code)} (errno {code}); {kept}"
      ) from e

  def save(self, step, *args, **kwargs):
    with self._as_output_error(None, again_ok=False):
      super().wait_until_finished()  # a failure of the previous save is reported as its own
    self._saving = int(step)  # the step an asynchronous failure reported later belongs to
    with self._as_output_error(int(step), again_ok=False):
      return super().save(step, *args, **kwargs)

  def wait_until_finished(self):
    with self._as_output_error(None, again_ok=True):
      return super().wait_until_finished()

  def close(self):
    try:
      with self._as_output_error(None, again_ok=True):
        super().close()
    finally:
      self._remove_failed()

  def _remove_failed(self) -> None:
    # Writes of a failed save's other items may still have been in flight when it was
    # reported. Orbax can even leave one writing past close() (its metadata thread), and
    # the folder may then reappear: harmless, as orbax never lists it as a step and the
    # next `create_manager` for writing removes it.
    for step in self.__dict__.get("_failed", ()):
      _remove_partial(self.directory, step)


def create_manager(
  workdir: str | epath.Path,
  *,
  keep: int = 2,
  save_every_steps: int = 0,
  async_save: bool = True,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  """A CheckpointManager on W/checkpoints keeping the last `keep` plus the best checkpoint.

  `save_every_steps` (0 = none) and preemption notices drive `manager.should_save`; the
  trainer also forces saves on evaluation steps (those carry `metrics`). A manager for
  writing removes the partial step folders of earlier, interrupted saves; hold the
  workdir's lock (`lsemil.training.workdir_lock.hold`) first, or another run's save in progress
  would be one of them.
  """
  save_policies = [_policies.PreemptionCheckpointingPolicy()]
  if save_every_steps > 0:
    save_policies.append(_policies.FixedIntervalPolicy(int(save_every_steps)))
  options = ocp.CheckpointManagerOptions(
    create=not read_only,
    read_only=read_only,
    best_fn=_metric,
    best_mode="max",
    save_decision_policy=_policies.AnySavePolicy(save_policies),
    preservation_policy=_policies.AnyPreservationPolicy(
      [
        _policies.LatestN(n=max(1, int(keep))),
        _policies.BestN(get_metric_fn=_metric, n=1, keep_checkpoints_without_metrics=False),
      ]
    ),
    enable_async_checkpointing=async_save,
  )
  if not read_only:
    _remove_partial(checkpoint_dir(workdir), None)  # synchronous: before any listing
  return _Manager(checkpoint_dir(workdir), options=options)


def _model_item(state: Any) -> dict:
  item = {"params": state.params}
  if state.batch_stats:
    item["batch_stats"] = state.batch_stats
  return item


def _opt_item(state: Any) -> dict:
  return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  train_iter: Any,
  *,
  config: ml_collections.ConfigDict,
  meta: dict,
  metrics: dict | None = None,
) -> None:
  """Saves the train state, the grain iterator, the config and `meta` at `step` (async)."""
  args = ocp.args.Composite(
    model=ocp.args.StandardSave(_model_item(state)),
    opt=ocp.args.StandardSave(_opt_item(state)),
    train_iter=grain.checkpoint.CheckpointSave(train_iter),
    config=ocp.args.JsonSave(config.to_dict()),
    meta=ocp.args.JsonSave(meta),
    **{integrity.ITEM: ocp.args.JsonSave(integrity.checksums(_model_item(state)))},
  )
  manager.save(int(step), args=args, metrics=metrics, force=True)


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, train_iter: Any
) -> tuple[Any, dict]:
  """Restores the state (into the shardings of `abstract_state`) and the grain iterator.

  `abstract_state` has jax.ShapeDtypeStruct leaves with target shardings (it is a
  TrainState); `train_iter` is advanced in place to the saved position. Returns
  (state, meta).
  """
  args = ocp.args.Composite(
    model=ocp.args.StandardRestore(_model_item(abstract_state)),
    opt=ocp.args.StandardRestore(_opt_item(abstract_state)),
    train_iter=grain.checkpoint.CheckpointRestore(train_iter),
    meta=ocp.args.JsonRestore(),
  )
  out = manager.restore(int(step), args=args)
  model, opt = out["model"], out["opt"]
  state = abstract_state.replace(
    params=model["params"],
    batch_stats=model.get("batch_stats", abstract_state.batch_stats),
    opt_state=opt["opt_state"],
    step=opt["step"],
    rng=opt["rng"],
  )
  integrity.verify(manager.directory / str(step), model, _stored_checksums(manager, step))
  return state, dict(out["meta"])


def _stored_checksums(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The step's `integrity.checksums` at save time; None for a step saved before them."""
  if not (epath.Path(manager.directory) / str(step) / integrity.ITEM).exists():
    return None
  args = ocp.args.Composite(**{integrity.ITEM: ocp.args.JsonRestore()})
  try:
    return dict(manager.restore(int(step), args=args)[integrity.ITEM])
  except Exception as e:  # orbax raises ValueError, KeyError, OSError, ...
    where = epath.Path(manager.directory) / str(step) / integrity.ITEM
    raise CheckpointError(f"{where}: unreadable checksums: {type(e).__name__}: {e}") from e


DAMAGED_MARK = ".damaged"  # suffix of a step folder moved aside on resume (never listed)


def restore_latest(
  manager: ocp.CheckpointManager, abstract_state: Any, train_iter: Any
) -> tuple[int, Any, dict] | None:
  """`restore` of the newest step that restores: (step, state, meta); None without steps.

  A damaged newer step is skipped with a warning naming it and why, and moved aside to
  `<step>.damaged` (kept for inspection, never deleted) so that training can save that step
  again; every step damaged is one CheckpointError.
  """
  damaged: dict[int, CheckpointError] = {}
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = restore(manager, step, abstract_state, train_iter)
    except Exception as e:  # orbax and tensorstore raise ValueError, KeyError, OSError, ...
      damaged[step] = _unreadable(epath.Path(manager.directory) / str(step), "", e)
      log.warning(f"cannot resume from checkpoint step {step}, trying an older one: "
                  f"{damaged[step]}")
      continue
    for bad in damaged if jax.process_index() == 0 else ():
      folder = epath.Path(manager.directory) / str(bad)
      folder.rename(folder.parent / f"{bad}{DAMAGED_MARK}-{int(time.time())}")
      log.warning(f"moved damaged checkpoint step {bad} aside to {folder}{DAMAGED_MARK}-*")
    if damaged:
      manager.reload()
    return step, state, meta
  if damaged:
    raise CheckpointError(
      f"{manager.directory}: no intact checkpoint to resume from (damaged steps: "
      f"{', '.join(map(str, sorted(damaged)))}); newest: {damaged[max(damaged)]}"
    )
  return None


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  args = ocp.args.Composite(meta=ocp.args.JsonRestore())
  return dict(manager.restore(int(step), args=args)["meta"])


def step_configs(workdir: str | epath.Path) -> dict[int, dict]:
  """The config each complete step of a workdir was saved with (its own config/ item), read
  without a manager for writing (nothing is removed). A step whose config cannot be read is
  left out: restoring it fails on its own, naming the file."""
  root = checkpoint_dir(workdir)
  _fresh_listing(root)
  if not root.is_dir():
    return {}
  # The config item's JSON file read directly: no manager, so no multi-host barrier (a
  # manager per process here mismatched orbax's root-metadata sync in a multi-host resume).
  out = {}
  for step in ocp.step.checkpoint_steps(root):
    with contextlib.suppress(Exception):  # unreadable: restoring it fails on its own
      out[int(step)] = dict(json.loads((root / str(step) / "config" / "metadata").read_text()))
  return out


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The step with the best validation mean AUC (None when no evaluated checkpoint)."""
  steps = [s for s in manager.all_steps() if manager.metrics(s) is not None]
  if not steps:
    return None
  return max(steps, key=lambda s: (_metric(manager.metrics(s)), s))


# --------------------------------------------------------------------------- inference


def _locate(path: epath.Path, which: str) -> tuple[epath.Path, int | None]:
  """(checkpoints root, step or None to choose by `which`) for a workdir, root or step dir."""
  _fresh_listing(path / CHECKPOINT_DIR)  # this process may have listed it before a save
  _fresh_listing(path)
  if (path / CHECKPOINT_DIR).is_dir():
    return path / CHECKPOINT_DIR, None
  if re.fullmatch(r"\d+", path.name) and (path / "model").is_dir():
    return path.parent, int(path.name)
  if path.is_dir() and any(re.fullmatch(r"\d+", p.name) for p in path.iterdir()):
    return path, None
  raise FileNotFoundError(
    f"{path}: neither a training workdir (with {CHECKPOINT_DIR}/), a checkpoints folder, nor "
    "a checkpoint step folder (with model/)"
  )


READ_ATTEMPTS = 20  # listings a reader tries while training's retention removes its steps


def _unreadable(step_dir: epath.Path, item: str, e: BaseException) -> CheckpointError:
  """One line naming the step, the item's file and orbax's (or tensorstore's) reason."""
  _reported_reads.add(str(step_dir).rstrip("/") + "/")  # "/": step 6 is not step 60
  text = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" [tensorstore_spec=")[0]
  if len(text) > 400:
    text = text[:400] + "..."
  where = step_dir / item / ("metadata" if item in ("config", "meta") else "")
  return CheckpointError(
    f"{str(where).rstrip('/')}: checkpoint step {step_dir.name} is unreadable: "
    f"{type(e).__name__}: {text}"
  )


def _restore_item(manager, step_dir: epath.Path, item: str, args) -> Any:
  try:
    return manager.restore(int(step_dir.name), args=ocp.args.Composite(**{item: args}))[item]
  except Exception as e:  # orbax and tensorstore raise ValueError, KeyError, OSError, ...
    raise _unreadable(step_dir, item, e) from e


def _read_step(manager, step_dir: epath.Path):
  """(config, model, variables, meta) of one step, or a CheckpointError naming the file."""
  head = {
    item: _restore_item(manager, step_dir, item, ocp.args.JsonRestore())
    for item in ("config", "meta")
  }
  try:
    config = ml_collections.ConfigDict(dict(head["config"]))
    model = registry.from_config(config.model, saved=True)
    abstract = jax.eval_shape(lambda: mil.init_variables(model, jax.random.key(0)))
  except Exception as e:  # a config that is JSON but not one of ours
    raise _unreadable(step_dir, "config", e) from e
  abstract = {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
  args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)
  variables = dict(_restore_item(manager, step_dir, "model", args))
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(abstract)}
  got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree.leaves_with_path(variables)}
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise CheckpointError(
        f"{step_dir / 'model'}: checkpoint step {step_dir.name} does not match its config "
        f"{step_dir / 'config' / 'metadata'}: {key} is stored as {got.get(key)}, the config "
        f"builds {want.get(key)}"
      )
  integrity.verify(step_dir, variables, _stored_checksums(manager, int(step_dir.name)))
  return config, model, variables, dict(head["meta"])


def _snapshot(step_dir: epath.Path) -> pathlib.Path | None:
  """Hard links of a local step folder's files in a private folder beside `checkpoints/`,
  returned (it holds the step as `<step>/`): a training's retention that removes the step
  while it is read removes only names, and the reader keeps the files. None where links
  cannot be made (gs://, a read-only workdir, another file system): the caller reads the
  step in place and retries. FileNotFoundError when the step is removed while linked."""
  if fileio.is_remote(step_dir):
    return None
  src = pathlib.Path(str(step_dir))
  try:
    held = pathlib.Path(tempfile.mkdtemp(prefix=".lsemil-read-", dir=src.parent.parent))
  except OSError:
    return None

  def fail(e: OSError):
    raise e

  try:
    for here, _, files in os.walk(src, onerror=fail):
      out = held / src.name / os.path.relpath(here, src)
      out.mkdir(parents=True, exist_ok=True)
      for name in files:
        os.link(os.path.join(here, name), out / name)
  except FileNotFoundError:
    shutil.rmtree(held, ignore_errors=True)
    raise
  except OSError:  # links not allowed here: read in place
    shutil.rmtree(held, ignore_errors=True)
    return None
  return held


def _read_held(manager, root: epath.Path, step: int, options):
  """`_read_step` of `root/step` through a hard-linked snapshot where one can be made (see
  `_snapshot`); errors name the step's own folder."""
  step_dir = root / str(step)
  try:
    held = _snapshot(step_dir)
  except FileNotFoundError as e:
    raise _unreadable(step_dir, "", e) from e
  if held is None:
    return _read_step(manager, step_dir)
  try:
    snapshot = ocp.CheckpointManager(epath.Path(held), options=options)
    try:
      return _read_step(snapshot, step_dir)
    finally:
      snapshot.close()
  finally:
    shutil.rmtree(held, ignore_errors=True)


def _candidates(manager, which: str) -> list[int]:
  """Steps to try in order: 'latest' newest first; 'best' by validation AUC, then newest."""
  steps = sorted(manager.all_steps(), reverse=True)
  if which == "latest":
    return steps
  metrics = {}
  for s in steps:
    with contextlib.suppress(Exception):  # unreadable metrics rank as unevaluated
      if (m := manager.metrics(s)) is not None:
        metrics[s] = _metric(m)
  ranked = sorted(metrics, key=lambda s: (metrics[s], s), reverse=True)
  return ranked + [s for s in steps if s not in metrics]


def _warn_skipped(root: epath.Path, damaged: dict, which: str) -> None:
  listed = set(ocp.step.checkpoint_steps(root)) if damaged else set()
  for step in sorted(damaged, reverse=True):
    if step in listed:  # still there: damaged, not removed by a training's retention
      log.warning(f"skipped damaged checkpoint step {step} (--which {which}): {damaged[step]}")


def _read_newest_intact(root: epath.Path, which: str):
  """(step, (config, model, variables, meta)) of the first intact step of `_candidates`.

  Training may remove a listed step before it is read (retention): the steps are listed
  again, up to READ_ATTEMPTS times. A step that is still there but unreadable is skipped
  with a warning naming it and why; nothing is deleted.
  """
  damaged: dict[int, CheckpointError] = {}
  last, seen = "changed while read", False
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  for _ in range(READ_ATTEMPTS):
    _fresh_listing(root)
    try:  # listing reads each step's metadata, which retention may remove meanwhile
      manager = ocp.CheckpointManager(root, options=options)
    except Exception as e:
      last = f"{type(e).__name__}: {e}"
      time.sleep(0.05)
      continue
    try:
      for step in [s for s in _candidates(manager, which) if s not in damaged]:
        try:
          read = _read_held(manager, root, step, options)
        except CheckpointError as e:
          damaged[step] = e
          continue
        _warn_skipped(root, damaged, which)
        return step, read
    except Exception as e:  # a listing or metrics file removed meanwhile: list again
      last = f"{type(e).__name__}: {e}"
    finally:
      with contextlib.suppress(Exception):
        manager.close()
    # A step removed while being read (retention) is not damaged: forget it and list again.
    _fresh_listing(root)
    listed = set(ocp.step.checkpoint_steps(root))
    damaged = {s: e for s, e in damaged.items() if s in listed}
    seen = seen or bool(listed)
    if not listed and partial_step_dirs(root):  # a save in flight: its step is coming
      time.sleep(0.05)
      continue
    if listed <= set(damaged) and (listed or not seen):
      break
    time.sleep(0.05)
  else:
    raise CheckpointError(
      f"{root}: the checkpoints were removed while being read, {READ_ATTEMPTS} times in a row "
      f"(a training with a small keep_checkpoints); try again ({last})"
    )
  if damaged:
    newest = max(damaged)
    raise CheckpointError(
      f"{root}: no intact checkpoint (damaged steps: {', '.join(map(str, sorted(damaged)))}); "
      f"newest: {damaged[newest]}"
    )
  raise FileNotFoundError(f"{root}: no checkpoints")


def load_inference(
  path: str | epath.Path, *, which: str = "best"
) -> tuple[ml_collections.ConfigDict, mil.MultiResolutionMIL, dict, int, dict]:
  """Loads weights for evaluation or prediction, without the optimizer state.

  Args:
    path: a training workdir, its checkpoints/ folder, or one step folder
      (W/checkpoints/<step>).
    which: for a workdir, 'best' (highest validation mean AUC; the latest when no
      checkpoint was evaluated) or 'latest'. Ignored for a step folder.

  A damaged step of a workdir (a truncated or missing file, bad JSON, a config that does not
  match the stored shapes) is skipped with a warning for the next one (`_read_newest_intact`),
  and a step removed by a running training while being read is retried; a damaged step
  folder asked for by path, or a workdir with no intact step, is one CheckpointError naming
  the step and the file.

  Returns:
    (config, model, variables, step, info): `variables` = {'params', 'batch_stats'?} as
    numpy arrays on the host, ready for `model.apply`; info has 'checkpoint' (the step
    folder), 'which', and the saved evaluation ('val_mean_auc', 'val_per_class_auc')
    when present.
  """
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  root, step = _locate(epath.Path(path), which)
  if step is None:
    step, (config, model, variables, meta) = _read_newest_intact(root, which)
  else:
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    manager = ocp.CheckpointManager(root, options=options)
    try:
      config, model, variables, meta = _read_step(manager, root / str(step))
    finally:
      manager.close()
  info = {"checkpoint": str(root / str(step)), "which": which, "step": int(step)}
  last = meta.get("last_eval") or {}
  if int(last.get("step", -1)) == int(step):
    info["val_mean_auc"] = last.get("val_mean_auc")
    info["val_per_class_auc"] = last.get("val_per_class_auc")
  logging.info("loaded %s (step %d)", info["checkpoint"], step)
  return config, model, variables, int(step), info
