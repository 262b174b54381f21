"""Fine-tuning: a run's first weights taken from another model (`lsemil train --init-from`).

The source is a training workdir (its best intact checkpoint, as `predict`, `export` and
`lsemil.load` read it), one checkpoint step folder, or a folder of `lsemil export`; it is read
through `lsemil.inference.engine.load`, which refuses non-finite weights and weights whose
bytes differ from their checksum (`lsemil.runtime.integrity`). What is copied:

- the backbone, every variable but the per-class head (the down path, the horizontal flow,
  the up path and their BatchNorm statistics, Sec 3.1-3.3): its shapes must be the run's own,
  or the source is refused, naming the first parameter that differs and both shapes;
- of the head, the shared saliency conv W (Sec 3.6; the GAP baseline's dense layer) and the
  LSE-LBA beta (Eq. 4), the columns of the classes both models have. A class of the run takes
  the source's class of the same name, else the class the synonym table calls the same
  finding (`lsemil.data.synonyms`, e.g. NIH `Effusion` = CheXpert `Pleural Effusion`). A class
  with no counterpart keeps its fresh initialisation, and so does a class that two source
  classes would fill (named in the mapping as not copied, never chosen at random). A head
  variable of another form (a shared beta against per-class ones, a pooling without beta)
  stays fresh too, with a note.

The mapping is reported through `lsemil.core.log`. The optimizer starts fresh; learning rate
and schedule are the config's. `freeze_backbone` is `train.freeze=backbone`: only the head
trains (TorchXRayVision's fine-tuning of the classifier alone, mlmed/torchxrayvision #63).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.traverse_util
import numpy as np
import optax

from lsemil.core import log
from lsemil.core.errors import CheckpointError, ConfigError
from lsemil.data import findings, synonyms
from lsemil.inference import engine

# The per-class head: the saliency conv W shared by every level (Sec 3.6) or the GAP
# baseline's dense layer (both named 'head'), and LSE-LBA's beta (Eq. 4, module 'pool').
HEAD_MODULES = ("head", "pool")
FREEZE_CHOICES = ("none", "backbone")
SEP = "/"


def is_head(path: Sequence[str]) -> bool:
  """Whether a variable path ('params', 'head', 'kernel') is part of the per-class head."""
  return len(path) > 1 and path[0] == "params" and path[1] in HEAD_MODULES


# --------------------------------------------------------------------------- classes


@dataclasses.dataclass(frozen=True)
class ClassMapping:
  """Which class of the source fills each class of the run (`map_classes`)."""

  target: tuple[str, ...]  # the run's classes, in output order
  source: tuple[str, ...]  # the source model's classes, in output order
  columns: tuple[int | None, ...]  # per run class: the source column copied, or None
  how: tuple[str, ...]  # per run class: 'same name', a synonym row, 'new' or why not copied

  @property
  def copied(self) -> list[tuple[str, str, str]]:
    """(run class, source class, how) of every copied class."""
    return [
      (t, self.source[c], h)
      for t, c, h in zip(self.target, self.columns, self.how, strict=True)
      if c is not None
    ]

  @property
  def new(self) -> list[str]:
    """Run classes that start fresh (no counterpart, or more than one)."""
    return [t for t, c in zip(self.target, self.columns, strict=True) if c is None]

  @property
  def unused(self) -> list[str]:
    """Source classes that fill no class of the run."""
    used = {c for c in self.columns if c is not None}
    return [s for i, s in enumerate(self.source) if i not in used]

  def lines(self) -> list[str]:
    """The mapping as log lines: copied (with how), new, and source classes left out."""
    out = [f"head: {len(self.copied)} of {len(self.target)} classes copied from the source"]
    for t, s, h in self.copied:
      out.append(f"  {t} <- {s}" + ("" if h == "same name" else f" (synonym: {h})"))
    fresh = [
      t if h == "new" else f"{t} ({h})"
      for t, c, h in zip(self.target, self.columns, self.how, strict=True)
      if c is None
    ]
    out.append(f"new classes (fresh rows): {', '.join(fresh) if fresh else 'none'}")
    out.append(f"source classes not used: {', '.join(self.unused) or 'none'}")
    return out


def map_classes(
  target: Sequence[str], target_source: str, source: Sequence[str], source_source: str
) -> ClassMapping:
  """The source column of each run class: the same name first, else the synonym table
  (`synonyms.resolve` between the two datasets). A run class that two source classes would
  fill through the table is not copied (its reason is in `how`). Repeated or empty class
  names on either side are a ConfigError."""
  target = findings.check_unique(target, "the run's data.classes")
  source = findings.check_unique(source, "the source model's data.classes")
  table = synonyms.resolve(target, target_source, source, source_source)
  columns: list[int | None] = []
  how: list[str] = []
  for name in target:
    if name in source:
      columns.append(source.index(name))
      how.append("same name")
      continue
    found = [p for p in table.pairs if p.model == name]
    if len(found) == 1:
      columns.append(source.index(found[0].data))
      how.append(found[0].finding)
    else:
      columns.append(None)
      candidates = ", ".join(p.data for p in found)
      how.append(f"not copied: the source has several ({candidates})" if found else "new")
  return ClassMapping(tuple(target), tuple(source), tuple(columns), tuple(how))


# --------------------------------------------------------------------------- weights


def _head_columns(path: str, src: np.ndarray, fresh: np.ndarray, mapping: ClassMapping):
  """(`fresh` with the mapped class columns (last axis) of `src`, None), or (`fresh`, a note)
  when the head's form differs (another pooling, a shared beta); a shared scalar is copied."""
  if src.shape == fresh.shape == ():
    return src.astype(fresh.dtype), None
  if src.ndim != fresh.ndim or src.shape[:-1] != fresh.shape[:-1]:
    return fresh, f"{path} is {src.shape} in the source, {fresh.shape} here: not copied"
  if src.shape[-1] != len(mapping.source) or fresh.shape[-1] != len(mapping.target):
    raise ConfigError(
      f"{path} has {src.shape[-1]} class columns in the source and {fresh.shape[-1]} here, "
      f"but the configs name {len(mapping.source)} and {len(mapping.target)} classes"
    )
  out = np.array(fresh, copy=True)
  for j, c in enumerate(mapping.columns):
    if c is not None:
      out[..., j] = src[..., c]
  return out, None


def _mismatch(path: str, source_shape, run_shape) -> ConfigError:
  return ConfigError(
    f"the source model's architecture differs from this run's: {path} is "
    f"{tuple(source_shape)} in the source, {tuple(run_shape)} here (set the run's model "
    "config to the source's, or train from scratch)"
  )


def transplant(source: dict, fresh: dict, mapping: ClassMapping) -> tuple[dict, list[str]]:
  """The run's first variables: `fresh` (its own initialisation, {'params',
  'batch_stats'?}) with the backbone of `source` and the head columns of `mapping`; and notes
  on head variables left fresh or unused (one model lacks them, or their form differs).

  Raises ConfigError naming the first backbone variable path ('params/stem/kernel') that one
  model has and the other lacks, or whose shape differs."""
  src = flax.traverse_util.flatten_dict(dict(source), sep=SEP)
  new = flax.traverse_util.flatten_dict(dict(fresh), sep=SEP)
  out, notes = {}, []
  for path in sorted(set(src) | set(new), key=lambda p: (not p.startswith("params/"), p)):
    head = is_head(path.split(SEP))
    if path not in new or path not in src:
      where = "the source" if path in src else "this run's model"
      if not head:
        raise ConfigError(
          f"the source model's architecture differs from this run's: only {where} has {path} "
          "(set the run's model config to the source's, or train from scratch)"
        )
      notes.append(f"{path}: only {where} has it" + ("" if path in src else "; fresh"))
      if path in new:
        out[path] = np.asarray(new[path])
      continue
    a, b = np.asarray(src[path]), np.asarray(new[path])
    if head:
      out[path], note = _head_columns(path, a, b, mapping)
      notes += [note] if note else []
    elif a.shape != b.shape:
      raise _mismatch(path, a.shape, b.shape)
    else:
      out[path] = a.astype(b.dtype)
  return flax.traverse_util.unflatten_dict(out, sep=SEP), notes


def _source_of(config) -> str:
  return (config.get("data") or {}).get("source") or "nih"


def initialize(source: str | os.PathLike, fresh: dict, config) -> tuple[dict, ClassMapping]:
  """`transplant` of the model at `source` (a workdir, a checkpoint step folder or an export
  folder) into `fresh`, the run's initial variables (host arrays) for `config`; the mapping
  is logged. Raises CheckpointError for a missing, damaged or non-finite source, ConfigError
  for another architecture."""
  try:
    loaded = engine.load(source, which="best")
  except (FileNotFoundError, CheckpointError) as e:  # the message names the path
    raise CheckpointError(f"train.init_from: {e}") from None
  mapping = map_classes(
    findings.of_config(config),
    _source_of(config),
    findings.of_config(loaded.config),
    _source_of(loaded.config),
  )
  try:
    variables, notes = transplant(loaded.variables, fresh, mapping)
  except ConfigError as e:
    raise ConfigError(f"train.init_from={source}: {e}") from None
  backbone = sum(
    np.size(v)
    for k, v in flax.traverse_util.flatten_dict(variables).items()
    if not is_head(k)
  )
  log.info(
    f"initialised from {loaded.checkpoint} (step {loaded.step}, source "
    f"{_source_of(loaded.config)}): backbone copied ({backbone:,} values), optimizer from scratch"
  )
  for line in [*mapping.lines(), *notes]:
    log.info(line)
  return variables, mapping


# --------------------------------------------------------------------------- freezing


def check_freeze(freeze: str) -> str:
  if freeze not in FREEZE_CHOICES:
    raise ConfigError(
      f"config train.freeze must be one of {', '.join(FREEZE_CHOICES)}, got {freeze!r}"
    )
  return freeze


def labels(params: Any) -> Any:
  """'head' or 'backbone' for each leaf of a params tree (optax.multi_transform's labels)."""
  flat = flax.traverse_util.flatten_dict(dict(params))
  marked = {k: "head" if is_head(("params", *k)) else "backbone" for k in flat}
  return flax.traverse_util.unflatten_dict(marked)


def freeze_backbone(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the head only; the backbone's updates are zero (optax.set_to_zero: no Adam
  moments and no weight decay there), so its parameters stay bit-identical. The trainer
  also keeps a frozen backbone's BatchNorm statistics (`trainer.train_step`)."""
  return optax.multi_transform({"head": tx, "backbone": optax.set_to_zero()}, labels)
