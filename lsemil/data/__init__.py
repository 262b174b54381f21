"""Data of Sec 4.1: the NIH ChestX-ray14 index and splits, images, input pipelines.

`nih` (index and splits), `statistics` (Table 1 as data), `imageio` and `dicom` (decoding),
`pipeline` (grain input pipelines), `preparation` (resized copies, TFDS via `tfds_builder`),
`phantoms` (a synthetic dataset in the NIH layout). Other sources: `index` (one index type),
`sources` (the registry of readers: `chexpert`, `mimic`, `vindr`, `rsna`, `siim`, `catalog`
for any CSV, and `nih`), `layouts` (synthetic datasets in each source's layout).
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
