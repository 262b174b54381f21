"""The NIH ChestX-ray14 release as an immutable index (paper Section 4.1, Table 1).

`load_index(nih_dir)` reads what the release contains, each file plain or gzipped:

- `Data_Entry_2017_v2020.csv` (or the older `Data_Entry_2017.csv`): one row per image, with
  'Finding Labels' joined by '|' or 'No Finding';
- `BBox_List_2017.csv`: the hand-drawn boxes of the test subset; its header `Bbox [x,y,w,h]`
  spans four columns, its label 'Infiltrate' means 'Infiltration', and its coordinates are
  pixels of the original 1024x1024 image (or of the stored image, for a dataset whose
  `lsemil_dataset.json` marker says so);
- `train_val_list.txt` and `test_list.txt`: the official patient-wise split;
- the images, under `images/` or the `images_0NN/images/` folders of the archives (optional:
  the metadata alone is indexed too).

Splits (Section 4.1): with the official lists, test is `test_list.txt` and the validation set
is a patient-wise 25% of `train_val_list.txt`, drawn deterministically from `seed`. Without the
lists (a subset of the release), the fallback is patient-wise too: `FALLBACK_TEST_FRACTION` of
the patients (drawn from `seed`) form the test set, and the rest is split 75/25 as above.

Bad input raises `DataError` naming the file and line; anomalies that leave the data sound are
counted in one `DataWarning` per kind and kept in `NihIndex.warnings`.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os
import re
import types
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from lsemil.core import errors

# The 14 findings in the order NIH lists them (and the paper's Tables 1 and 3 follow).
CLASSES: tuple[str, ...] = (
  "Atelectasis",
  "Cardiomegaly",
  "Effusion",
  "Infiltration",
  "Mass",
  "Nodule",
  "Pneumonia",
  "Pneumothorax",
  "Consolidation",
  "Edema",
  "Emphysema",
  "Fibrosis",
  "Pleural_Thickening",
  "Hernia",
)
NUM_CLASSES = len(CLASSES)
CLASS_INDEX: Mapping[str, int] = types.MappingProxyType({c: i for i, c in enumerate(CLASSES)})
# The 8 classes that have boxes in BBox_List_2017.csv.
BOX_CLASSES: tuple[str, ...] = CLASSES[:8]
NO_FINDING = "No Finding"
# BBox_List_2017.csv spells one class differently from Data_Entry.
BOX_LABEL_ALIASES: Mapping[str, str] = types.MappingProxyType({"Infiltrate": "Infiltration"})

SPLITS: tuple[str, ...] = ("train", "valid", "test")
VALID_FRACTION = 0.25  # of the train_val patients (Section 4.1: "a further 75%-25% split")
FALLBACK_TEST_FRACTION = 0.2  # of all patients, when the official lists are absent
ORIGINAL_SIZE = 1024  # NIH images are 1024x1024; boxes are in these pixels
PREPARED_SIZE = 512  # the paper downsamples to 512x512 (Sec 4.2)

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_NAME = "BBox_List_2017.csv"
TRAIN_VAL_NAME = "train_val_list.txt"
TEST_NAME = "test_list.txt"
MARKER_NAME = "lsemil_dataset.json"

_ID_RE = re.compile(r"^(\d+)_\d+\.png$")


DataError = errors.DataError  # bad dataset input; the message names the file and line


@dataclasses.dataclass(frozen=True, eq=False)
class NihIndex:
  """An immutable table of the release: one row per image, plus its boxes.

  Row `i` is image `image_ids[i]` of patient `patient_ids[i]`, with multi-hot `labels[i]`
  (order `CLASSES`), split `splits[i]` (one of `SPLITS`) and file `image_paths[i]` (None when
  the folder holds no image of that name). Box `j` lies on row `box_rows[j]`, has class
  `box_classes[j]` and `box_xywh[j]` = (x, y, w, h) in pixels of a `box_space` square image.
  """

  root: Path
  image_ids: tuple[str, ...]
  patient_ids: np.ndarray  # int64 (N,)
  labels: np.ndarray  # uint8 (N, 14)
  splits: np.ndarray  # <U5 (N,)
  image_paths: tuple[Path | None, ...]
  box_rows: np.ndarray  # int64 (B,)
  box_classes: np.ndarray  # int64 (B,)
  box_xywh: np.ndarray  # float64 (B, 4)
  box_space: int
  image_size: int
  kind: str  # "nih" or what the marker says, e.g. "synthetic"
  official_split: bool
  seed: int
  warnings: tuple[str, ...] = ()
  _row_of: Mapping[str, int] = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    for name in ("patient_ids", "labels", "splits", "box_rows", "box_classes", "box_xywh"):
      arr = np.array(getattr(self, name))  # own copy, then freeze it
      arr.flags.writeable = False
      object.__setattr__(self, name, arr)
    row_of = {image_id: i for i, image_id in enumerate(self.image_ids)}
    object.__setattr__(self, "_row_of", types.MappingProxyType(row_of))

  def __len__(self) -> int:
    return len(self.image_ids)

  def row(self, image_id: str) -> int:
    """The row of `image_id`; KeyError if it is not in the index."""
    return self._row_of[image_id]

  def rows(self, split: str) -> np.ndarray:
    """Row numbers of one split, in CSV order."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.flatnonzero(self.splits == split)

  def boxes(self, row: int) -> list[tuple[int, tuple[float, float, float, float]]]:
    """The boxes of one row as (class index, (x, y, w, h)) in `box_space` pixels."""
    sel = np.flatnonzero(self.box_rows == row)
    return [(int(self.box_classes[j]), tuple(float(v) for v in self.box_xywh[j])) for j in sel]

  def patients(self, split: str | None = None) -> np.ndarray:
    """Sorted unique patient ids, of one split or of all."""
    ids = self.patient_ids if split is None else self.patient_ids[self.rows(split)]
    return np.unique(ids)


# --------------------------------------------------------------------------- reading files


def _find(root: Path, names: tuple[str, ...]) -> Path | None:
  for name in names:
    for candidate in (root / name, root / (name + ".gz")):
      if candidate.is_file():
        return candidate
  return None


def _open_text(path: Path) -> io.TextIOBase:
  if path.suffix == ".gz":
    return gzip.open(path, "rt", encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of a CSV file, with trailing empty fields removed; skips blank lines."""
  with _open_text(path) as f:
    reader = csv.reader(f)
    try:
      for fields in reader:
        while fields and fields[-1].strip() == "":
          fields.pop()
        if fields:
          yield reader.line_num, fields
    except csv.Error as e:
      raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text ({e})") from e
    except (OSError, EOFError) as e:
      raise DataError(f"{path}: cannot read ({e})") from e


def _read_list(path: Path) -> list[tuple[int, str]]:
  out = []
  try:
    with _open_text(path) as f:
      for lineno, line in enumerate(f, 1):
        name = line.strip()
        if name:
          out.append((lineno, name))
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read ({e})") from e
  return out


def read_marker(nih_dir: str | os.PathLike) -> dict:
  """The folder's `lsemil_dataset.json` as a dict ({} when absent); bad fields raise."""
  path = Path(nih_dir) / MARKER_NAME
  if not path.is_file():
    return {}
  try:
    marker = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a JSON object ({e})") from e
  if not isinstance(marker, dict):
    raise DataError(f"{path}: not a JSON object")
  for key in ("image_size", "box_space"):
    value = marker.get(key)
    if value is not None and (not isinstance(value, int) or value <= 0):
      raise DataError(f"{path}: field {key!r} must be a positive integer, got {value!r}")
  return marker


def _scan_images(root: Path) -> dict[str, Path]:
  """File name -> path of the PNGs under images/ and images_NNN/images/.

  Entries that cannot even be stat'ed (a symlink loop, a dangling link, no permission) are
  listed too: reading them fails with an `ImageError` naming the file, which the reader
  (prepare's --on-bad, the input pipeline) reports, instead of this scan crashing.
  """
  folders = [root / "images"]
  folders += sorted(p / "images" for p in root.glob("images_[0-9]*") if p.is_dir())
  found: dict[str, Path] = {}
  for folder in folders:
    if not folder.is_dir():
      continue
    with os.scandir(folder) as it:
      for entry in it:
        if not entry.name.endswith(".png"):
          continue
        try:
          is_file = entry.is_file()
        except OSError:
          is_file = True  # e.g. ELOOP: reported when read
        if not is_file:
          continue
        if entry.name in found:
          raise DataError(f"duplicate image {entry.name}: {found[entry.name]} and {entry.path}")
        found[entry.name] = Path(entry.path)
  return found


NAME_MAX = 255  # bytes of one file name (Linux, macOS): a longer image id names no file


def long_image_ids(image_ids) -> list[str]:
  """The ids no file can be named after (longer than NAME_MAX bytes)."""
  return [i for i in image_ids if len(i.encode("utf-8", "surrogateescape")) > NAME_MAX]


def short_id(image_id: str, keep: int = 40) -> str:
  """An id fit for a message: long ones cut, with their length."""
  if len(image_id) <= keep + 10:
    return image_id
  return f"{image_id[:keep]}... ({len(image_id)} characters)"


def _parse_labels(text: str, path: Path, lineno: int) -> np.ndarray:
  names = text.split("|")
  hot = np.zeros(NUM_CLASSES, np.uint8)
  if names == [NO_FINDING]:
    return hot
  for name in names:
    if name == NO_FINDING:
      raise DataError(f"{path}:{lineno}: 'No Finding' combined with findings in {text!r}")
    if name not in CLASS_INDEX:
      raise DataError(
        f"{path}:{lineno}: unknown label {name!r} in 'Finding Labels' {text!r} "
        f"(expected '|'-joined names from {', '.join(CLASSES)} or 'No Finding')"
      )
    hot[CLASS_INDEX[name]] = 1
  return hot


def _read_data_entry(path: Path):
  rows = _csv_rows(path)
  try:
    _, header = next(rows)
  except StopIteration:
    raise DataError(f"{path}:1: empty file, expected a header line") from None
  required = ("Image Index", "Finding Labels", "Patient ID")
  cols = {}
  for name in required:
    if name not in header:
      raise DataError(f"{path}:1: header lacks column {name!r} (got {header})")
    cols[name] = header.index(name)
  need = max(cols.values()) + 1
  ids, pids, labels, lines = [], [], [], []
  first_line: dict[str, int] = {}
  for lineno, fields in rows:
    if len(fields) < need or len(fields) > len(header):
      raise DataError(
        f"{path}:{lineno}: malformed row, {len(fields)} fields where the header has "
        f"{len(header)}"
      )
    image_id = fields[cols["Image Index"]].strip()
    if not image_id or "/" in image_id or "\\" in image_id:
      raise DataError(f"{path}:{lineno}: bad 'Image Index' {image_id!r}")
    if image_id in first_line:
      raise DataError(
        f"{path}:{lineno}: duplicate image id {image_id} (first on line {first_line[image_id]})"
      )
    first_line[image_id] = lineno
    pid_text = fields[cols["Patient ID"]].strip()
    try:
      pid = int(pid_text)
    except ValueError:
      raise DataError(f"{path}:{lineno}: 'Patient ID' {pid_text!r} is not an integer") from None
    m = _ID_RE.match(image_id)
    if m and int(m.group(1)) != pid:
      raise DataError(
        f"{path}:{lineno}: 'Patient ID' {pid} does not match image id {image_id}"
      )
    ids.append(image_id)
    pids.append(pid)
    labels.append(_parse_labels(fields[cols["Finding Labels"]].strip(), path, lineno))
    lines.append(lineno)
  if not ids:
    raise DataError(f"{path}: no image rows after the header")
  return ids, np.asarray(pids, np.int64), np.stack(labels), lines


def _read_bbox(path: Path, row_of: Mapping[str, int], box_space: int, csv_name: str):
  rows = _csv_rows(path)
  try:
    _, header = next(rows)
  except StopIteration:
    raise DataError(f"{path}:1: empty file, expected a header line") from None
  if header[:2] != ["Image Index", "Finding Label"] or not "".join(header[2:3]).startswith("Bbox"):
    raise DataError(
      f"{path}:1: expected header 'Image Index,Finding Label,Bbox [x,y,w,h],,,', got {header}"
    )
  brows, bclasses, bxywh, blines = [], [], [], []
  first_line: dict[tuple, int] = {}
  for lineno, fields in rows:
    if len(fields) != 6:
      raise DataError(
        f"{path}:{lineno}: malformed row, expected 6 fields (image, label, x, y, w, h), "
        f"got {len(fields)}"
      )
    image_id, label = fields[0].strip(), fields[1].strip()
    label = BOX_LABEL_ALIASES.get(label, label)
    if label not in CLASS_INDEX:
      raise DataError(f"{path}:{lineno}: unknown box label {fields[1]!r}")
    if image_id not in row_of:
      raise DataError(f"{path}:{lineno}: image {image_id} is not in {csv_name}")
    try:
      x, y, w, h = (float(v) for v in fields[2:6])
    except ValueError:
      raise DataError(f"{path}:{lineno}: box coordinates {fields[2:6]} are not numbers") from None
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
      raise DataError(f"{path}:{lineno}: degenerate box x={x} y={y} w={w} h={h}")
    if x < 0 or y < 0 or x + w > box_space or y + h > box_space:
      raise DataError(
        f"{path}:{lineno}: box x={x:g} y={y:g} w={w:g} h={h:g} lies outside the "
        f"{box_space}x{box_space} image"
      )
    key = (image_id, label, x, y, w, h)
    if key in first_line:
      # The real file has no repeated box; a repeat would be counted twice in every protocol.
      raise DataError(f"{path}:{lineno}: duplicate box, the same as line {first_line[key]}")
    first_line[key] = lineno
    brows.append(row_of[image_id])
    bclasses.append(CLASS_INDEX[label])
    bxywh.append((x, y, w, h))
    blines.append(lineno)
  return (
    np.asarray(brows, np.int64),
    np.asarray(bclasses, np.int64),
    np.asarray(bxywh, np.float64).reshape(-1, 4),
    blines,
  )


# --------------------------------------------------------------------------- splits


def _patient_split(patients: np.ndarray, fraction: float, seed: int, salt: int) -> np.ndarray:
  """A deterministic set of round(fraction * len) patients drawn from sorted `patients`."""
  patients = np.unique(patients)
  rng = np.random.default_rng([seed, salt])
  n = int(round(fraction * len(patients)))
  return np.sort(patients[rng.permutation(len(patients))[:n]])


def _official_splits(
  ids, pids, lines, csv_path: Path, tv_path: Path, test_path: Path
) -> np.ndarray:
  row_of = {image_id: i for i, image_id in enumerate(ids)}
  member = np.full(len(ids), -1, np.int8)  # 0 train_val, 1 test
  where: dict[int, tuple[Path, int]] = {}
  for code, path in ((0, tv_path), (1, test_path)):
    for lineno, image_id in _read_list(path):
      i = row_of.get(image_id)
      if i is None:
        raise DataError(
          f"{path}:{lineno}: image {image_id} is not in {csv_path.name} (a subset of the "
          f"release? remove both list files to use the patient-wise fallback split)"
        )
      if member[i] >= 0:
        p, ln = where[i]
        what = "listed twice" if p == path else f"also listed in {p.name}:{ln}"
        raise DataError(f"{path}:{lineno}: image {image_id} {what}")
      member[i] = code
      where[i] = (path, lineno)
  missing = np.flatnonzero(member < 0)
  if len(missing):
    i = missing[0]
    raise DataError(
      f"{csv_path}:{lines[i]}: image {ids[i]} is in neither {tv_path.name} nor "
      f"{test_path.name} ({len(missing)} such images)"
    )
  leaked = np.intersect1d(pids[member == 0], pids[member == 1])
  if len(leaked):
    p = leaked[0]
    i = int(np.flatnonzero((pids == p) & (member == 0))[0])
    j = int(np.flatnonzero((pids == p) & (member == 1))[0])
    raise DataError(
      f"patient {p} is in both splits: {ids[i]} ({where[i][0]}:{where[i][1]}) and {ids[j]} "
      f"({where[j][0]}:{where[j][1]}); {len(leaked)} such patients"
    )
  return member


def _assign_splits(
  pids: np.ndarray, is_test: np.ndarray, seed: int, val_fraction: float
) -> np.ndarray:
  splits = np.full(len(pids), "train", dtype="<U5")
  splits[is_test] = "test"
  valid_patients = _patient_split(pids[~is_test], val_fraction, seed, salt=1)
  splits[~is_test & np.isin(pids, valid_patients)] = "valid"
  return splits


# --------------------------------------------------------------------------- entry point


def load_index(
  nih_dir: str | os.PathLike, *, seed: int = 0, val_fraction: float = VALID_FRACTION
) -> NihIndex:
  """Reads an NIH ChestX-ray14 folder (or a synthetic one in its layout) into an `NihIndex`.

  Args:
    nih_dir: the folder holding the Data_Entry CSV and, optionally, the box list, the two
      official list files, the images and an `lsemil_dataset.json` marker.
    seed: draws the validation patients (and, without official lists, the test patients).
    val_fraction: the patient-wise fraction of train_val that becomes 'valid' (Sec 4.1: 25%).

  Raises:
    DataError: naming the file and line of the first bad input.
  """
  root = Path(nih_dir)
  if not root.is_dir():
    raise DataError(f"{root}: not a folder")
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
  csv_path = _find(root, DATA_ENTRY_NAMES)
  if csv_path is None:
    raise DataError(f"{root}: no {' or '.join(DATA_ENTRY_NAMES)} (plain or .gz)")
  marker = read_marker(root)
  kind = str(marker.get("kind", "nih"))
  image_size = int(marker.get("image_size", ORIGINAL_SIZE))
  box_space = int(marker.get("box_space", ORIGINAL_SIZE))
  notes: list[str] = []

  ids, pids, labels, lines = _read_data_entry(csv_path)
  row_of = {image_id: i for i, image_id in enumerate(ids)}

  tv_path, test_path = _find(root, (TRAIN_VAL_NAME,)), _find(root, (TEST_NAME,))
  if (tv_path is None) != (test_path is None):
    have, lack = (tv_path, TEST_NAME) if test_path is None else (test_path, TRAIN_VAL_NAME)
    raise DataError(f"{have}: found without {root / lack}; provide both lists or neither")
  official = tv_path is not None
  if official:
    is_test = _official_splits(ids, pids, lines, csv_path, tv_path, test_path) == 1
  else:
    is_test = np.isin(pids, _patient_split(pids, FALLBACK_TEST_FRACTION, seed, salt=0))
  splits = _assign_splits(pids, is_test, seed, val_fraction)

  bbox_path = _find(root, (BBOX_NAME,))
  if bbox_path is not None:
    box_rows, box_classes, box_xywh, _ = _read_bbox(bbox_path, row_of, box_space, csv_path.name)
  else:
    box_rows = box_classes = np.zeros(0, np.int64)
    box_xywh = np.zeros((0, 4), np.float64)
  if len(box_rows):
    unlabelled = int(np.sum(labels[box_rows, box_classes] == 0))
    if unlabelled:
      notes.append(f"{bbox_path}: {unlabelled} boxes name a class their image is not labelled with")
    off_test = int(np.sum(splits[box_rows] != "test"))
    if off_test:
      notes.append(f"{bbox_path}: {off_test} boxes lie on images outside the test split")

  on_disk = _scan_images(root)
  paths = tuple(on_disk.get(image_id) for image_id in ids)
  too_long = long_image_ids(ids)
  if too_long:
    notes.append(
      f"{csv_path}: {len(too_long)} image ids are longer than {NAME_MAX} bytes, so no file "
      f"can have their name (first: {short_id(too_long[0])}); they count as missing images"
    )
  if on_disk:
    absent = sum(p is None for p in paths)
    if absent:
      notes.append(f"{root}: {absent} images of {csv_path.name} have no file under images/")
    extra = len(set(on_disk) - set(row_of))
    if extra:
      notes.append(f"{root}: {extra} image files are not in {csv_path.name} (ignored)")
  for note in notes:
    warnings.warn(note, errors.DataWarning, stacklevel=2)

  return NihIndex(
    root=root,
    image_ids=tuple(ids),
    patient_ids=pids,
    labels=labels,
    splits=splits,
    image_paths=paths,
    box_rows=box_rows,
    box_classes=box_classes,
    box_xywh=box_xywh,
    box_space=box_space,
    image_size=image_size,
    kind=kind,
    official_split=official,
    seed=seed,
    warnings=tuple(notes),
  )


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def require_local(data_dir: str | os.PathLike) -> None:
  """Raises `DataError` for a URL-like data folder (gs://, s3://, any scheme://): the
  data layer reads local files only (pathlib, cv2), while workdirs may be remote."""
  if _URL.match(os.fspath(data_dir)):
    raise DataError(
      f"data folders must be on local disk: {os.fspath(data_dir)} is remote; copy it to each "
      "host first, e.g. tpu_scripts/stage_data.sh with STAGE_TO=workers"
    )


def open_index(
  nih_dir: str | os.PathLike, *, val_fraction: float, split_seed: int
) -> NihIndex:
  """`load_index` of a local folder with the config's validation fraction and split seed."""
  require_local(nih_dir)
  return load_index(nih_dir, seed=split_seed, val_fraction=val_fraction)
