"""One index for every chest X-ray source: what each reader of `lsemil.data.sources` returns.

A `SourceIndex` is one row per image: its id, the file where the release keeps it, the
patient, the split (`SPLITS`), and a float32 label matrix over the source's own class names
(1 present, 0 absent, NaN unknown: uncertain or blank under the `ignore` policies); plus
boxes (row, class, x, y, w, h in pixels of the original image) and, where the source has them
(SIIM-ACR), masks as the release's run-length strings, one per component.

The shared pieces of the readers live here too:

- `LabelPolicy` and `label_value`: the CheXpert convention of 1 / 0 / -1 / blank (Irvin et al.,
  AAAI 2019, Sec. 3: positive, negative, uncertain, not mentioned) and the U-Ignore /
  U-Zeros / U-Ones approaches to the uncertain label; a blank is a negative by default
  (`blank="zeros"`, as the CheXpert authors train) or unknown (`blank="ignore"`);
- `table_rows`: a CSV file (plain or gzipped) as (line number, {column: text}), every
  malformed row a `DataError` naming the file and the line;
- `patient_splits`: the deterministic patient-wise split of a source without an official one;
- `missing_files`: the images of an index that have no file, counted and named in one note.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gzip
import math
import os
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from lsemil.core.errors import DataError, DataWarning

SPLITS: tuple[str, ...] = ("train", "valid", "test")
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")  # U-Ignore, U-Zeros, U-Ones
BLANK_POLICIES = ("zeros", "ignore")
VIEWS = ("frontal", "all")
READER_POLICIES = ("any", "majority")  # VinDr-CXR: a finding of any reader, or of most
TEST_FRACTION = 0.2  # of the patients, for a source without an official test split
VALID_FRACTION = 0.25  # of the remaining patients (the paper's 75/25 of Sec 4.1)
SHOW = 5  # image names a note lists before '...'


@dataclasses.dataclass(frozen=True)
class Options:
  """How a reader turns a release into an index (each field's choices are named beside it).

  uncertain: what -1 becomes (`UNCERTAIN_POLICIES`: NaN, 0 or 1); blank: what an empty cell
  becomes (`BLANK_POLICIES`: 0 or NaN); views: `frontal` keeps PA / AP images only (CheXpert,
  MIMIC-CXR), `all` every view; readers: a VinDr-CXR finding is positive when `any` reader
  marks it or the `majority` does (`READER_POLICIES`); seed, val_fraction, test_fraction: the
  patient-wise draws.
  """

  uncertain: str = "ignore"
  blank: str = "zeros"
  views: str = "frontal"
  readers: str = "any"
  seed: int = 0
  val_fraction: float = VALID_FRACTION
  test_fraction: float = TEST_FRACTION

  def __post_init__(self):
    for name, allowed in (("uncertain", UNCERTAIN_POLICIES), ("blank", BLANK_POLICIES),
                          ("views", VIEWS), ("readers", READER_POLICIES)):
      if getattr(self, name) not in allowed:
        raise DataError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
    for name in ("val_fraction", "test_fraction"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise DataError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, eq=False)
class SourceIndex:
  """An immutable table of one release: one row per image, its boxes and masks.

  Row `i` is image `image_ids[i]` of patient `patient_ids[i]` in split `splits[i]`, stored at
  `image_paths[i]` (a str, where the release puts it; `missing` names the ids without a file;
  strings, not `Path`s, since building 377k `Path`s alone takes seconds), with
  labels `labels[i]` over `classes` (float32, NaN = unknown). Box `j` lies on row
  `box_rows[j]`, class `box_classes[j]`, `box_xywh[j]` in original pixels. `masks` maps a row
  to {class: run-length strings} (`lsemil.data.siim.decode_rle` reads them).
  """

  source: str
  root: Path
  classes: tuple[str, ...]
  image_ids: tuple[str, ...]
  image_paths: tuple[str, ...]
  patient_ids: np.ndarray  # str (N,)
  splits: np.ndarray  # <U5 (N,)
  labels: np.ndarray  # float32 (N, C), NaN = unknown
  box_rows: np.ndarray  # int64 (B,)
  box_classes: np.ndarray  # int64 (B,)
  box_xywh: np.ndarray  # float64 (B, 4)
  official_split: bool
  seed: int
  masks: Mapping[int, Mapping[int, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
  image_size: tuple[int, int] | None = None  # (height, width) when the release fixes it
  missing: tuple[str, ...] = ()
  warnings: tuple[str, ...] = ()

  def __post_init__(self):
    n, c = len(self.image_ids), len(self.classes)
    shapes = {"image_paths": (n,), "patient_ids": (n,), "splits": (n,), "labels": (n, c)}
    for name, shape in shapes.items():
      if np.shape(getattr(self, name)) != shape:
        raise ValueError(f"{name} has shape {np.shape(getattr(self, name))}, expected {shape}")
    for name in ("patient_ids", "splits", "labels", "box_rows", "box_classes", "box_xywh"):
      arr = np.array(getattr(self, name))
      arr.flags.writeable = False
      object.__setattr__(self, name, arr)
    object.__setattr__(self, "masks", types.MappingProxyType(dict(self.masks)))

  def __len__(self) -> int:
    return len(self.image_ids)

  def rows(self, split: str) -> np.ndarray:
    """Row numbers of one split, in file order."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.flatnonzero(self.splits == split)

  def patients(self, split: str | None = None) -> np.ndarray:
    """Sorted unique patient ids, of one split or of all."""
    ids = self.patient_ids if split is None else self.patient_ids[self.rows(split)]
    return np.unique(ids)

  def boxes(self, row: int) -> list[tuple[int, tuple[float, float, float, float]]]:
    """The boxes of one row as (class index, (x, y, w, h))."""
    sel = np.flatnonzero(self.box_rows == row)
    return [(int(self.box_classes[j]), tuple(float(v) for v in self.box_xywh[j])) for j in sel]


# --------------------------------------------------------------------------- labels


@dataclasses.dataclass(frozen=True)
class LabelPolicy:
  """Numbers for the uncertain (-1) and blank cells, from `Options`."""

  uncertain: float
  blank: float

  @classmethod
  def of(cls, options: Options) -> LabelPolicy:
    uncertain = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[options.uncertain]
    return cls(uncertain=uncertain, blank={"zeros": 0.0, "ignore": np.nan}[options.blank])

  @functools.cached_property
  def table(self) -> dict[str, float]:
    """Cell text -> value under this policy."""
    return {t: self.blank if c is None else self.uncertain if c < 0 else c
            for t, c in _CODES.items()}

  def row(self, cells: Sequence[str], where: str, columns: Sequence[str]) -> list[float]:
    """`label_value` of each cell of one row (one dict lookup per cell: 3.2M cells of
    MIMIC-CXR in about a second); the first bad cell raises as `label_value` does."""
    values = [self.table.get(c, _BAD) for c in cells]
    if _BAD in values:
      return [label_value(c, self, where, col) for c, col in zip(cells, columns, strict=True)]
    return values


_CODES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": None}
_BAD = "bad"


def label_value(text: str, policy: LabelPolicy, where: str, column: str) -> float:
  """One cell of a 1 / 0 / -1 / blank label column under `policy`; `where` is 'file:line'."""
  code = _CODES.get(text.strip(), _BAD)
  if code == _BAD:
    raise DataError(f"{where}: {column!r} is {text!r}, expected 1, 0, -1 or blank")
  if code is None:
    return policy.blank
  return policy.uncertain if code < 0 else code


# --------------------------------------------------------------------------- files


def find_file(root: Path, name: str) -> Path | None:
  """root/name or root/name.gz, whichever is a file."""
  for candidate in (root / name, root / (name + ".gz")):
    if candidate.is_file():
      return candidate
  return None


def table_rows(
  path: Path, required: Sequence[str] = ()
) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
  """The header (names stripped) and the rows of a CSV file as ('file:line', {column: text}).

  Blank lines are skipped; a row with more fields than the header, a missing required
  column, bad CSV or bad UTF-8 is a `DataError` naming the file and line.
  """
  if path.suffix == ".gz":
    f = gzip.open(path, "rt", encoding="utf-8", newline="")
  else:
    f = open(path, encoding="utf-8", newline="")
  reader = csv.reader(f)
  try:
    header = [name.strip() for name in next(reader)]
  except StopIteration:
    f.close()
    raise DataError(f"{path}:1: empty file, expected a header line") from None
  except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
    f.close()
    raise DataError(f"{path}:1: cannot read the header ({e})") from e
  for name in required:
    if name not in header:
      f.close()
      raise DataError(f"{path}:1: header lacks column {name!r} (got {header})")

  def rows() -> Iterator[tuple[str, dict[str, str]]]:
    at, width = f"{path}:", len(header)  # per row: the stats of 377k MIMIC rows take seconds
    with f:
      try:
        for fields in reader:
          if len(fields) != width:
            if not fields or not "".join(fields).strip():
              continue
            if len(fields) > width:
              raise DataError(
                f"{at}{reader.line_num}: {len(fields)} fields where the header has {width}"
              )
            fields += [""] * (width - len(fields))
          elif not fields[0].strip() and not "".join(fields).strip():
            continue
          yield at + str(reader.line_num), dict(zip(header, fields, strict=True))
      except (csv.Error, UnicodeDecodeError, OSError, EOFError) as e:
        raise DataError(f"{path}:{reader.line_num}: cannot read ({e})") from e

  return header, rows()


def xywh_box(
  cells: Sequence[str], at: str, side: float = math.inf
) -> tuple[float, float, float, float] | None:
  """(x, y, w, h) from four cells (None when all are blank); a box that is not four finite
  numbers with w, h > 0 inside a `side` x `side` image (corner >= 0) raises, naming `at`."""
  cells = [c.strip() for c in cells]
  if not any(cells):
    return None
  try:
    x, y, w, h = box = tuple(float(c) for c in cells)
  except ValueError:
    raise DataError(f"{at}: box {cells} is not four numbers") from None
  if not all(math.isfinite(v) for v in box) or w <= 0 or h <= 0:
    raise DataError(f"{at}: degenerate box x={x:g} y={y:g} w={w:g} h={h:g}")
  if x < 0 or y < 0 or x + w > side or y + h > side:
    where = "off the image" if side == math.inf else f"outside the {side:g}x{side:g} image"
    raise DataError(f"{at}: box x={x:g} y={y:g} w={w:g} h={h:g} lies {where}")
  return box


def first_names(names: Sequence[str]) -> str:
  """Up to `SHOW` names joined by ', ', with '...' when there are more."""
  shown = ", ".join(names[:SHOW])
  return shown + (", ..." if len(names) > SHOW else "")


def missing_files(ids: Sequence[str], paths: Sequence[str]) -> tuple[str, ...]:
  """The ids whose path is not a file (stat only; nothing is opened)."""
  return tuple(i for i, p in zip(ids, paths, strict=True) if not os.path.isfile(p))


def missing_note(root: Path, missing: Sequence[str], total: int) -> str | None:
  """The one-line note for images without a file, or None when every image has one."""
  if not missing:
    return None
  return f"{root}: {len(missing)} of {total} images have no file ({first_names(list(missing))})"


# --------------------------------------------------------------------------- splits


def patient_splits(patients: np.ndarray, options: Options) -> np.ndarray:
  """A deterministic patient-wise split for a source without an official one.

  `test_fraction` of the sorted unique patients (drawn from `options.seed`) are test, then
  `val_fraction` of the others valid; the rest train. Returns <U5 per row of `patients`.
  """
  unique = np.unique(patients)
  order = np.random.default_rng([options.seed, 20]).permutation(len(unique))
  n_test = int(round(options.test_fraction * len(unique)))
  rest = len(unique) - n_test
  n_valid = int(round(options.val_fraction * rest))
  code = np.zeros(len(unique), np.int8)
  code[order[:n_test]] = 2
  code[order[n_test : n_test + n_valid]] = 1
  per_row = code[np.searchsorted(unique, patients)]
  return np.asarray(SPLITS, dtype="<U5")[per_row]


def valid_from_train(patients: np.ndarray, splits: np.ndarray, options: Options) -> np.ndarray:
  """`splits` with `val_fraction` of the train patients (drawn from the seed) made valid."""
  train = np.unique(patients[splits == "train"])
  order = np.random.default_rng([options.seed, 21]).permutation(len(train))
  chosen = train[order[: int(round(options.val_fraction * len(train)))]]
  out = splits.copy()
  out[(splits == "train") & np.isin(patients, chosen)] = "valid"
  return out


def check_patient_splits(
  patients: np.ndarray, splits: np.ndarray, where: Sequence[str]
) -> None:
  """Raises `DataError` for a patient in two splits, naming both rows (`where[i]`)."""
  first: dict[str, int] = {}
  for i, (p, s) in enumerate(zip(patients.tolist(), splits.tolist(), strict=True)):
    j = first.setdefault(p, i)
    if splits[j] != s:
      raise DataError(
        f"{where[i]}: patient {p} is in split {s} here and in {splits[j]} at {where[j]}"
      )


def empty_boxes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(rows, classes, xywh) of an index without boxes."""
  return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float64)


def build(
  source: str,
  root: Path,
  classes: Sequence[str],
  rows: Mapping[str, Sequence],
  options: Options,
  *,
  official_split: bool,
  notes: Sequence[str] = (),
  boxes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
  masks: Mapping[int, Mapping[int, tuple[str, ...]]] | None = None,
  image_size: tuple[int, int] | None = None,
) -> SourceIndex:
  """A `SourceIndex` from a reader's columns (`rows`: ids, paths, patients, splits, labels),
  with the missing files counted; each note (and that count) is one `DataWarning`."""
  ids, paths = tuple(rows["ids"]), tuple(rows["paths"])
  if not ids:
    raise DataError(f"{root}: no image rows")
  missing = missing_files(ids, paths)
  notes = list(notes)
  note = missing_note(root, missing, len(ids))
  if note:
    notes.append(note)
  for n in notes:
    warnings.warn(n, DataWarning, stacklevel=3)
  box_rows, box_classes, box_xywh = empty_boxes() if boxes is None else boxes
  return SourceIndex(
    source=source,
    root=root,
    classes=tuple(classes),
    image_ids=ids,
    image_paths=paths,
    patient_ids=np.asarray(rows["patients"]),
    splits=np.asarray(rows["splits"], dtype="<U5"),
    labels=np.asarray(rows["labels"], np.float32).reshape(len(ids), len(classes)),
    box_rows=box_rows,
    box_classes=box_classes,
    box_xywh=box_xywh,
    official_split=official_split,
    seed=options.seed,
    masks=masks or {},
    image_size=image_size,
    missing=missing,
    warnings=tuple(notes),
  )
