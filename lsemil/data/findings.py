"""The class list as data: which findings a run predicts, read from its config.

A run's config names its dataset reader in `data.source` and, once training has read the
source, the reader's class names in `data.classes`; both are saved with every checkpoint, so
`predict`, `evaluate`, `reproduce`, the reports, `export` and `lsemil.load` take their column
names from here, never from a list of their own. A checkpoint written before the class list
was data has neither field set: it is an NIH run, and its classes are NIH's 14
(`lsemil.data.nih.CLASSES`, the only place those names are written).
"""

from __future__ import annotations

from collections.abc import Sequence

from lsemil.core.errors import ConfigError
from lsemil.data import nih


def of_config(config) -> tuple[str, ...]:
  """The class names of the run that `config` describes, in the model's output order.

  Raises:
    ConfigError: a non-NIH source whose config names no classes, or a class list whose
      length is not `model.num_classes`.
  """
  data = config.get("data") or {}
  source = data.get("source") or "nih"
  classes = tuple(data.get("classes") or ())
  if not classes:
    if source != "nih":
      raise ConfigError(f"data.classes is empty for source {source!r}: the run's config "
                        "names no classes")
    classes = nih.CLASSES
  num_classes = config.get("model", {}).get("num_classes")
  if num_classes is not None and num_classes != len(classes):
    raise ConfigError(f"model.num_classes is {num_classes} but data.classes names "
                      f"{len(classes)} classes: {', '.join(classes)}")
  return classes


def check_unique(classes: Sequence[str], where: str) -> tuple[str, ...]:
  """`classes` as a tuple, refusing an empty or repeated name (`where` names the file)."""
  names = tuple(str(c) for c in classes)
  bad = sorted({c for c in names if not c.strip() or names.count(c) > 1})
  if bad:
    raise ConfigError(f"{where}: empty or repeated class names: {', '.join(map(repr, bad))}")
  return names
