"""lsemil: multi-resolution multi-instance learning with LSE-LBA pooling.

A JAX/Flax reimplementation of Yao et al. 2018, "Weakly Supervised Medical
Diagnosis and Localization from Multiple Resolutions".

The names a user imports live here (`lsemil.lse_lba`, `lsemil.load_config`, ...); the
packages below hold the rest, by layer: core, data, models, metrics, runtime, inference,
training, reporting, workflows, commands. A name is imported on first use, so that
`import lsemil` (and `lsemil --help`, which imports it) stays free of JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# With jax[tpu] installed on a host without TPU chips (to compile for TPUs, `lsemil aot`),
# libtpu prints metadata-server errors whenever jax starts; set (before jax starts) what
# quiets it. Nothing changes on a TPU VM or where the variables are already set.
importlib.import_module("lsemil.runtime.accelerators").quiet_libtpu()  # jax-free

if TYPE_CHECKING:
  from lsemil.core.configuration import load_config
  from lsemil.data.nih import CLASSES
  from lsemil.inference.engine import Predictor
  from lsemil.inference.trained_model import TrainedModel, load
  from lsemil.metrics.classification import bootstrap_auc_ci, mean_auc, per_class_auc, roc_auc
  from lsemil.metrics.localization import score_all
  from lsemil.metrics.overlap import dice, iobb_accuracy, uniform_dice
  from lsemil.models.mil import MultiResolutionMIL, init_variables
  from lsemil.models.pooling import generalized_mean, lse, lse_lba, max_pool, mean_pool, noisy_or
  from lsemil.models.registry import from_config
  from lsemil.training.objective import binary_cross_entropy

__all__ = [
  "__version__",
  # pooling (Sec 3.4, 3.5)
  "lse_lba",
  "lse",
  "generalized_mean",
  "noisy_or",
  "max_pool",
  "mean_pool",
  # the model (Sec 3) and its config
  "MultiResolutionMIL",
  "from_config",
  "init_variables",
  "load_config",
  "CLASSES",
  # the loss (Sec 3.6)
  "binary_cross_entropy",
  # a trained model
  "load",
  "TrainedModel",
  "Predictor",
  # metrics (Sec 4.2)
  "roc_auc",
  "per_class_auc",
  "mean_auc",
  "bootstrap_auc_ci",
  "dice",
  "uniform_dice",
  "iobb_accuracy",
  "score_all",
]

# Each name's module: the imports above, read at first use (tests/unit/test_api.py checks both).
_EXPORTS = {
  "lsemil.core.configuration": ("load_config",),
  "lsemil.data.nih": ("CLASSES",),
  "lsemil.inference.engine": ("Predictor",),
  "lsemil.inference.trained_model": ("TrainedModel", "load"),
  "lsemil.metrics.classification": ("bootstrap_auc_ci", "mean_auc", "per_class_auc", "roc_auc"),
  "lsemil.metrics.localization": ("score_all",),
  "lsemil.metrics.overlap": ("dice", "iobb_accuracy", "uniform_dice"),
  "lsemil.models.mil": ("MultiResolutionMIL", "init_variables"),
  "lsemil.models.pooling": (
    "generalized_mean",
    "lse",
    "lse_lba",
    "max_pool",
    "mean_pool",
    "noisy_or",
  ),
  "lsemil.models.registry": ("from_config",),
  "lsemil.training.objective": ("binary_cross_entropy",),
}
_SOURCES = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
  """PEP 562: import a public name's module on first use and keep the name here."""
  if name not in _SOURCES:
    raise AttributeError(f"module 'lsemil' has no attribute {name!r}")
  value = getattr(importlib.import_module(_SOURCES[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_SOURCES})
