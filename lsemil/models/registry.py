"""Which model a run is, and which saliency map source it takes.

Two architectures share the trainer, the input pipeline and the one inference path:

- 'mil': `lsemil.models.mil.MultiResolutionMIL` (the paper, Sec 3); its saliency map S is the
  model's own output (source 'model', Sec 3.6);
- 'gap': `lsemil.models.gap_classifier.GlobalAveragePoolingClassifier` (the single-resolution,
  post-hoc baseline of Sec 2.2 / 2.3); its maps come afterwards from 'gradcam' (at
  `gradcam_level`, an index into the down path's levels, -1 = the coarsest) or 'cam'
  (`lsemil.models.posthoc`).

`config.model.arch` names the architecture. A config without the field is refused, except
the config stored in a checkpoint written before the field existed (`saved=True`): those runs
were all MIL runs. A saved config also lacks the model fields added after it was written
(the speed options of configs/paper.py): they take the paper config's values, which is what
those runs used. `saliency_settings` resolves a run's map source from an explicit choice
(`lsemil evaluate --saliency`) or the run's config (MIL -> 'model'; GAP -> its
`config.saliency.source`), and refuses a source the architecture does not have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from lsemil.core import configuration
from lsemil.core.errors import ConfigError
from lsemil.models import gap_classifier, mil

MIL, GAP = "mil", "gap"
ARCHS = (MIL, GAP)
SOURCES = {MIL: ("model",), GAP: ("gradcam", "cam")}
ALL_SOURCES = ("model", "gradcam", "cam")
DEFAULT_GRADCAM_LEVEL = -1


def _get(cfg: Any, key: str, default=None):
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return cfg[key] if key in cfg.keys() else default


def arch_of_config(model_cfg: Any, *, saved: bool = False) -> str:
  """'mil' or 'gap' of a `config.model`; missing only in old checkpoints (`saved`): 'mil'."""
  arch = _get(model_cfg, "arch")
  if arch is None:
    if saved:
      return MIL
    raise ConfigError(f"model config: arch: missing; set model.arch to one of {ARCHS}")
  if arch not in ARCHS:
    raise ConfigError(f"model config: arch: unknown {arch!r}; choose one of {ARCHS}")
  return arch


def _mil_fields(model_cfg: Any) -> ml_collections.ConfigDict:
  """The MIL model's own fields (`lsemil.models.mil` reads them as attributes)."""
  return ml_collections.ConfigDict({k: model_cfg[k] for k in model_cfg.keys() if k != "arch"})


def _with_later_fields(model_cfg: Any, module: type) -> ml_collections.ConfigDict:
  """A saved `config.model` with the fields of `module` it lacks as configs/paper.py sets them."""
  out = ml_collections.ConfigDict({k: model_cfg[k] for k in model_cfg.keys()})
  fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name", "arch"}
  missing = fields - set(out.keys())
  if missing:
    paper = configuration.load_config("paper").model
    for key in sorted(missing & set(paper.keys())):
      out[key] = paper[key]
  return out


def from_config(model_cfg: Any, *, saved: bool = False):
  """Builds the run's model from `config.model` (ConfigError naming a bad field); a config
  saved in a checkpoint (`saved`) gets the fields added since from configs/paper.py."""
  if arch_of_config(model_cfg, saved=saved) == GAP:
    if saved:
      model_cfg = _with_later_fields(model_cfg, gap_classifier.GlobalAveragePoolingClassifier)
    return gap_classifier.from_config(model_cfg)
  if saved:
    model_cfg = _with_later_fields(model_cfg, mil.MultiResolutionMIL)
  return mil.from_config(_mil_fields(model_cfg))


def validate(model_cfg: Any, *, saved: bool = False) -> mil.ModelSpec:
  """The architecture's config check (before anything compiles); a GAP model's spec has its
  level sides and no fused levels (no up path)."""
  if arch_of_config(model_cfg, saved=saved) == GAP:
    return mil.ModelSpec(level_sides=gap_classifier.validate(model_cfg), fused_levels=())
  return mil.validate(_mil_fields(model_cfg))


def arch_of(model: Any) -> str:
  """'gap' for the GAP classifier, 'mil' for any other module (the MIL model's contract:
  `apply` returns 'probs' and 'saliency')."""
  return GAP if isinstance(model, gap_classifier.GlobalAveragePoolingClassifier) else MIL


def check_source(arch: str, source: str, level: int | None = None, num_levels: int = 0) -> None:
  """Raises ConfigError (naming --saliency / --gradcam-level) for a source the arch lacks."""
  if source not in ALL_SOURCES:
    raise ConfigError(f"--saliency {source}: unknown; choose one of {ALL_SOURCES}")
  if source not in SOURCES[arch]:
    what = "the MIL model" if arch == MIL else "the GAP baseline (model.arch = 'gap')"
    raise ConfigError(
      f"--saliency {source}: this run is {what}, whose saliency sources are "
      f"{', '.join(SOURCES[arch])}"
    )
  if level is not None and source == "gradcam" and num_levels:
    if not -num_levels <= int(level) < num_levels:
      raise ConfigError(
        f"--gradcam-level {level}: the model has {num_levels} levels "
        f"(0..{num_levels - 1}, or -1 for the coarsest)"
      )


def saliency_settings(
  config: Any, source: str | None = None, level: int | None = None
) -> tuple[str, int | None]:
  """(source, gradcam level or None) of a run: the explicit choice, else the run's config.

  MIL runs: 'model'. GAP runs: `config.saliency.source` ('gradcam' when absent) and
  `config.saliency.gradcam_level` (-1 when absent). The level is None unless the source is
  'gradcam'. Raises ConfigError for a source the run's architecture does not have.
  """
  arch = arch_of_config(config.model, saved=True)
  sal = _get(config, "saliency") or {}
  if source is None:
    source = _get(sal, "source", "gradcam") if arch == GAP else "model"
  if source == "gradcam" and level is None:
    level = int(_get(sal, "gradcam_level", DEFAULT_GRADCAM_LEVEL))
  num_levels = len(tuple(config.model.widths)) if arch == GAP else 0
  check_source(arch, source, level, num_levels)
  return source, (int(level) if source == "gradcam" else None)
