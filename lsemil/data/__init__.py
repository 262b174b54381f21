"""Data: the NIH ChestX-ray14 index and splits, Table 1 statistics, a synthetic dataset.

Paper Section 4.1. Submodules: `nih` (index and splits), `stats` (Table 1), `synth`
(synthetic NIH-layout dataset).
"""

from lsemil.core.errors import DataWarning
from lsemil.data.nih import (
  BOX_CLASSES,
  CLASSES,
  NUM_CLASSES,
  SPLITS,
  DataError,
  NihIndex,
  load_index,
)

__all__ = [
  "BOX_CLASSES",
  "CLASSES",
  "NUM_CLASSES",
  "SPLITS",
  "DataError",
  "DataWarning",
  "NihIndex",
  "load_index",
]
