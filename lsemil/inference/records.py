"""What a checkpoint carries beside its weights: its operating points and its recalibration.

A training workdir W keeps them in its evaluation records (W/evaluation_<split>.json, written
by `lsemil evaluate`: `operating_points` of the valid split, `calibration_file` of
`--calibrate`); a folder of `lsemil export` in thresholds.json and calibration.json. `lsemil
predict`, `lsemil serve` and `lsemil.load` read them here, so all three decide with the same
thresholds (p >= t on the model's own probability, `readout.decisions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from lsemil.core import fileio
from lsemil.core.errors import ConfigError, OutputError
from lsemil.data import findings
from lsemil.inference import engine
from lsemil.metrics import calibration


def workdir_of(path) -> epath.Path:
  """The training workdir of a workdir, its checkpoints/ folder or a step folder."""
  p = fileio.as_path(path)
  if p.name.isdigit() and p.parent.name == "checkpoints":
    return p.parent.parent
  if p.name == "checkpoints":
    return p.parent
  return p


def default_output(
  workdir, split: str = "test", source: str | None = None, data_source: str | None = None
) -> epath.Path:
  """W/evaluation_<split>.json: where `evaluate --workdir W` writes with the run's own
  saliency source and `reproduce` looks; W/evaluation_<split>_<source>.json for another
  saliency source (e.g. 'cam' of a Grad-CAM run); ..._on_<data_source>.json for another
  dataset source's data (cross-dataset evaluation, never read as the run's own)."""
  name = f"evaluation_{split}" + (f"_{source}" if source else "")
  name += f"_on_{data_source}" if data_source else ""
  return fileio.as_path(workdir) / f"{name}.json"


def _record(path) -> dict:
  """An evaluation JSON's object (its step, operating points and calibration file)."""
  result = fileio.read_json(path)
  if not isinstance(result, dict):
    raise OutputError(f"{path}: not a JSON object")
  return result


def stored_operating_points(workdir, step: int | None) -> dict | None:
  """The operating points of W/evaluation_valid.json when it evaluated `step`, else None."""
  path = default_output(workdir, "valid")
  if step is None or not path.exists():
    return None
  valid = _record(path)
  return valid.get("operating_points") if valid.get("step") == int(step) else None


def stored_calibration(workdir, step: int | None) -> tuple[dict, str] | None:
  """(the parameters of `evaluate --calibrate`, the evaluated split) of the first of
  W/evaluation_test.json, _valid.json, _train.json that evaluated `step` with a
  recalibration, else None (the fit is on the valid split whichever split was evaluated)."""
  for split in ("test", "valid", "train"):
    path = default_output(workdir, split)
    if step is None or not path.exists():
      continue
    ev = _record(path)
    name = ev.get("calibration_file")
    if ev.get("step") == int(step) and name and (path.parent / name).exists():
      return fileio.read_json(path.parent / name), split
  return None


def check_calibration(params: Mapping, classes: Sequence[str]) -> None:
  """ConfigError for recalibration parameters of other classes, or that do not apply."""
  stored = params.get("classes") if isinstance(params, Mapping) else None
  if stored is not None and list(stored) != list(classes):
    raise ConfigError(
      f"calibration parameters: classes {list(stored)[:3]}... are not the model's "
      f"{len(classes)} classes ({', '.join(classes[:3])}...)"
    )
  calibration.apply(params, np.full((1, len(classes)), 0.5))  # raises naming the field


def model_calibration(loaded: engine.LoadedModel) -> dict | None:
  """The recalibration stored with a checkpoint: an exported folder's calibration.json, or
  the `evaluate --calibrate` fit of the step in its workdir (`stored_calibration`); None
  when there is none."""
  if loaded.info.get("which") == "export":
    path = fileio.as_path(loaded.checkpoint) / "calibration.json"
    params = fileio.read_json(path) if path.exists() else None
  else:
    found = stored_calibration(workdir_of(loaded.checkpoint), loaded.step)
    path, params = "the workdir's evaluate --calibrate parameters", found and found[0]
  if not params or not params.get("method"):
    return None
  try:
    check_calibration(params, findings.of_config(loaded.config))
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return dict(params)


def model_thresholds(loaded: engine.LoadedModel) -> dict | None:
  """The operating points stored with a checkpoint ({'rule', 'fit_split', 'classes',
  'thresholds'}): an exported folder's thresholds.json, or the valid evaluation of the step
  in its workdir (`stored_operating_points`); None when there are none. ConfigError naming
  the file for thresholds of other classes than the model's."""
  if loaded.info.get("which") == "export":
    path = fileio.as_path(loaded.checkpoint) / "thresholds.json"
    ops = fileio.read_json(path) if path.exists() else None
  else:
    path = default_output(workdir_of(loaded.checkpoint), "valid")
    ops = stored_operating_points(workdir_of(loaded.checkpoint), loaded.step)
  if not ops or ops.get("thresholds") is None:
    return None
  classes = findings.of_config(loaded.config)
  if list(ops.get("classes") or ()) != list(classes) or len(ops["thresholds"]) != len(classes):
    raise ConfigError(f"{path}: operating points are not for the model's {len(classes)} "
                      f"classes in order ({', '.join(classes[:3])}...)")
  return dict(ops)
