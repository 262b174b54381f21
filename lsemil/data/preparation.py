"""`lsemil prepare`: a dataset folder of any source -> a folder of size x size 8-bit PNGs (or,
for NIH, a TFDS dataset).

Sec 4.2 of the paper: "the inputs of 1024x1024 are downsampled with skimage.transform.resize
to 512x512". `lsemil.data.imageio.resize_gray` matches that resize to rounding at cv2 speed;
every source's images get it (DICOM decoded by `lsemil.data.dicom`: Modality and VOI LUT or
window, MONOCHROME1 inverted; JPEG and PNG by `imageio.read_gray`).

An NIH folder's output P is itself an NIH-layout folder, so `load_index(P)` works on it:

- `P/images/<image_id>`: size x size 8-bit grayscale PNGs (`--format png`), or
  `P/tfds/nih_chest_xray14/...`: an array_record TFDS dataset (`--format tfds`, see
  `lsemil.data.tfds_builder`);
- the Data_Entry CSV and the two split lists as found (rows of skipped images dropped),
  `BBox_List_2017.csv` with coordinates scaled to the output size, `bad_files.txt` when
  `--on-bad skip` skipped anything, and the marker `lsemil_dataset.json`
  {kind: prepared, format, image_size: size, box_space: size, source: nih, classes, ...}.

Any other source's output (`prepare_source`, read back by `read_prepared`):

- `P/images/<stored_name(image_id)>`: the PNGs;
- `P/index.csv`: `image_id,file,patient,split`, then one column per class in the source's
  order: 1, 0, or blank where the label is unknown (NaN under the reader's policies);
- `P/boxes.csv` (`image_id,class,x,y,w,h`) and `P/masks.csv` (`image_id,class,EncodedPixels`,
  SIIM-ACR's run-length code of the union of an image's components) in pixels of the stored
  images: x scaled by size / W, y by size / H of each decoded image;
- `bad_files.txt`, and the marker {kind: prepared, format: png, image_size, box_space, source,
  classes, official_split, options: the uncertain / blank / views / readers policies, seed
  and val_fraction it was prepared with, images, prepared_from}.
The policies and the split are fixed here: `open_source_index` refuses other ones.

Resumable: every image is written to a temporary name and renamed, so an image that exists
under its final name is complete; a second run skips those, and temporary files left by an
interrupted run are deleted, never trusted. The marker is written last.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from lsemil.core import fileio, log
from lsemil.core.errors import DataError, ImageError, OutputError, PrepareError
from lsemil.data import dicom, imageio, index, nih

MARKER_NAME = nih.MARKER_NAME
BAD_FILES_NAME = "bad_files.txt"
STAGING_NAME = ".staging"  # tfds: resumable PNG stage, removed once the dataset is built
STATE_NAME = ".lsemil_prepare.json"  # settings of an unfinished run, to refuse mixing sizes
DEFAULT_SIZE = nih.PREPARED_SIZE
_LIST_NAMES = ("train_val_list.txt", "test_list.txt")


def expected_image_path(nih_dir: Path, image_id: str) -> Path:
  return nih_dir / "images" / image_id


# --------------------------------------------------------------------------- boxes


def scale_box(
  xywh: Sequence[float], from_space: float, to_size: float
) -> tuple[float, float, float, float]:
  """Box (x, y, w, h) in pixels of a from_space-square image -> pixels of a to_size one."""
  f = to_size / from_space
  return tuple(float(v) * f for v in xywh)  # type: ignore[return-value]


def _fmt(v: float) -> str:
  return repr(float(v))


# --------------------------------------------------------------------------- metadata I/O


def _find(root: Path, name: str) -> Path | None:
  for p in (root / name, root / (name + ".gz")):
    if p.is_file():
      return p
  return None


def _find_data_entry(root: Path) -> Path:
  for name in ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"):
    p = _find(root, name)
    if p is not None:
      return p
  raise nih.DataError(f"{root}: no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv")


def _read_text(path: Path) -> str:
  if path.suffix == ".gz":
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
      return f.read()
  return path.read_text(encoding="utf-8")


def _write_text_atomic(path: Path, text: str) -> None:
  """`fileio.write_bytes` of the text, gzip-compressed for a .gz name (as NIH ships them)."""
  data = text.encode("utf-8")
  fileio.write_bytes(path, gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


def _copy_filtered_csv(src: Path, dst_dir: Path, drop: set[str]) -> None:
  """Copies a CSV whose first column is the image id, dropping rows of `drop`."""
  dst = dst_dir / src.name
  if not drop:
    shutil.copyfile(src, dst)
    return
  rows = list(csv.reader(io.StringIO(_read_text(src), newline="")))
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerows(r for i, r in enumerate(rows) if i == 0 or not r or r[0].strip() not in drop)
  _write_text_atomic(dst, buf.getvalue())


def _copy_filtered_list(src: Path, dst_dir: Path, drop: set[str]) -> None:
  dst = dst_dir / src.name
  if not drop:
    shutil.copyfile(src, dst)
    return
  lines = _read_text(src).splitlines()
  kept = [ln for ln in lines if ln.strip() not in drop]
  _write_text_atomic(dst, "\n".join(kept) + "\n")


def _write_bbox(src: Path, dst: Path, from_space: float, size: int, drop: set[str]) -> int:
  """Rewrites the box list with coordinates in pixels of the size x size output."""
  text = _read_text(src)
  rows = list(csv.reader(io.StringIO(text, newline="")))
  if not rows:
    raise nih.DataError(f"{src}: empty box list")
  out = []
  for lineno, r in enumerate(rows[1:], 2):
    if not r or all(not v.strip() for v in r):
      continue
    if r[0].strip() in drop:
      continue
    if len(r) < 6:
      raise nih.DataError(f"{src}:{lineno}: malformed box row {r}")
    try:
      box = scale_box([float(v) for v in r[2:6]], from_space, size)
    except ValueError:
      raise nih.DataError(f"{src}:{lineno}: box coordinates {r[2:6]} are not numbers") from None
    out.append(r[:2] + [_fmt(v) for v in box] + r[6:])
  buf = io.StringIO()
  buf.write(text.splitlines()[0] + "\n")  # NIH's header verbatim: 'Bbox [x,y,w,h],,,'
  csv.writer(buf, lineterminator="\n").writerows(out)
  _write_text_atomic(dst, buf.getvalue())
  return len(out)


def origin(nih_dir: Path) -> str:
  """What an NIH-layout folder holds, for the marker of its prepared copy ('prepared_from',
  which a model card reads): 'nih' (no lsemil marker: the release as NIH gives it),
  'synthetic' (`lsemil synth`), or for a prepared folder what that was prepared from."""
  marker = nih.read_marker(nih_dir)
  if marker.get("kind") == "prepared":
    return str(marker.get("prepared_from", "unknown"))
  return str(marker.get("kind", "nih"))


def write_metadata(
  nih_dir: Path, out: Path, *, size: int, fmt: str, bad: dict[str, str], extra: dict
) -> None:
  """Metadata files and bad_files.txt of a prepared folder; the marker comes last."""
  drop = set(bad)
  _copy_filtered_csv(_find_data_entry(nih_dir), out, drop)
  for name in _LIST_NAMES:
    src = _find(nih_dir, name)
    if src is not None:
      _copy_filtered_list(src, out, drop)
  bbox = _find(nih_dir, "BBox_List_2017.csv")
  if bbox is not None:
    from_space = float(nih.read_marker(nih_dir).get("box_space", nih.ORIGINAL_SIZE))
    _write_bbox(bbox, out / "BBox_List_2017.csv", from_space, size, drop)
  _write_bad_files(out, bad)
  marker = {"kind": "prepared", "format": fmt, "image_size": size, "box_space": size, **extra}
  _write_text_atomic(out / MARKER_NAME, json.dumps(marker, indent=2) + "\n")


def _write_bad_files(out: Path, bad: dict[str, str]) -> None:
  """bad_files.txt: one 'image id<TAB>reason' line per skipped image (removed when none)."""
  bad_path = out / BAD_FILES_NAME
  if bad:
    lines = [f"{image_id}\t{reason}" for image_id, reason in sorted(bad.items())]
    _write_text_atomic(bad_path, "\n".join(lines) + "\n")
  elif bad_path.exists():
    bad_path.unlink()


# --------------------------------------------------------------------------- images


def read_image(path: str | os.PathLike) -> np.ndarray:
  """uint8 (H, W) grey of a stored image of any source: DICOM through `lsemil.data.dicom`
  (Modality and VOI LUT or window, MONOCHROME1 inverted), PNG / JPEG through
  `imageio.read_gray`."""
  if dicom.is_dicom(path):
    return dicom.read_dicom(path)
  return imageio.read_gray(path)


def convert_image(
  src: str | None, dst: str, size: int, read=imageio.read_gray
) -> tuple[str | None, tuple[int, int] | None]:
  """Decode (`read`) + resize + write one image; returns (None, the source's (H, W)) or
  (the reason it is bad, the input's fault, None). Failing to write the output raises
  OutputError naming it."""
  try:
    if src is None:
      raise ImageError(f"{dst}: source image not found")
    decoded = read(src)
    img = imageio.resize_gray(decoded, size)
  except ImageError as e:
    return str(e), None
  except cv2.error as e:  # a decoder failure imageio's checks did not foresee
    return f"{src}: cannot decode ({str(e).strip().splitlines()[-1]})", None
  try:
    imageio.write_png_atomic(Path(dst), imageio.encode_png(img))
  except OSError as e:
    raise OutputError(f"{dst}: cannot write ({e.strerror or e})") from None
  return None, decoded.shape[:2]


def process_image(src: str | None, dst: str, size: int) -> str | None:
  """`convert_image` of an NIH PNG: None or the reason the image is bad."""
  return convert_image(src, dst, size)[0]


def _process_star(args):
  image_id, src, dst, size = args
  return image_id, src, process_image(src, dst, size)


def _convert_star(args):
  row, src, dst, size = args
  return (row, src, *convert_image(src, dst, size, read_image))


def _clean_temp(folder: Path) -> int:
  n = 0
  for p in folder.glob(".*.tmp"):
    p.unlink()
    n += 1
  return n


@dataclasses.dataclass
class Summary:
  total: int = 0
  written: int = 0
  already_done: int = 0
  bad: dict[str, str] = dataclasses.field(default_factory=dict)  # image id -> reason
  stale_temp_removed: int = 0
  seconds: float = 0.0
  dropped_from: str = "the copied Data_Entry and split lists"

  def lines(self, on_bad: str) -> list[str]:
    out = [
      f"prepared {self.total - len(self.bad)}/{self.total} images "
      f"({self.written} written, {self.already_done} already done) in {self.seconds:.1f}s"
    ]
    if self.stale_temp_removed:
      out.append(f"removed {self.stale_temp_removed} temporary files of an interrupted run")
    if self.bad:
      out.append(
        f"{len(self.bad)} bad images {'skipped' if on_bad == 'skip' else 'found'}; their rows "
        f"were dropped from {self.dropped_from} (see {BAD_FILES_NAME}):"
      )
      out += [f"  {reason}" for _, reason in sorted(self.bad.items())[:20]]
      if len(self.bad) > 20:
        out.append(f"  ... and {len(self.bad) - 20} more")
    return out


def write_images(
  nih_dir: Path,
  images_dir: Path,
  *,
  size: int,
  on_bad: str = "error",
  workers: int | None = None,
  progress: log.Progress | None = None,
) -> Summary:
  """Resizes every image of the index into images_dir (parallel, resumable); reports each
  image done to `progress` as 'prepare'."""
  index = nih.open_index(nih_dir, val_fraction=nih.VALID_FRACTION, split_seed=0)
  images_dir.mkdir(parents=True, exist_ok=True)
  summary = Summary(total=len(index), stale_temp_removed=_clean_temp(images_dir))
  start = time.perf_counter()
  todo = []
  too_long = set(nih.long_image_ids(index.image_ids))
  for row, image_id in enumerate(index.image_ids):
    if image_id in too_long:  # no such file can exist, in the input or the output
      reason = (
        f"{expected_image_path(nih_dir, nih.short_id(image_id))}: image id longer than "
        f"{nih.NAME_MAX} bytes, which no file name can be"
      )
      _bad(summary, image_id, reason, on_bad)
      continue
    dst = images_dir / image_id
    if dst.is_file():
      summary.already_done += 1
      continue
    src = index.image_paths[row]
    todo.append((image_id, None if src is None else str(src), str(dst), size))
  with _parallel(_process_star, todo, workers) as results:
    for image_id, src, reason in log.tracked(results, progress, "prepare", len(todo)):
      if reason is None:
        summary.written += 1
        continue
      if src is None:
        reason = f"{expected_image_path(nih_dir, image_id)}: file not found"
      _bad(summary, image_id, reason, on_bad)
  summary.seconds = time.perf_counter() - start
  return summary


@contextlib.contextmanager
def _parallel(fn, todo: list, workers: int | None) -> Iterator:
  """`map(fn, todo)` in `workers` spawned processes (default: all cores), unordered."""
  workers = (os.cpu_count() or 1) if workers is None else workers
  pool = None
  try:
    if workers > 1 and len(todo) > 1:
      pool = multiprocessing.get_context("spawn").Pool(workers)
      yield pool.imap_unordered(fn, todo, chunksize=16)
    else:
      yield map(fn, todo)
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()


def _bad(summary: Summary, image_id: str, reason: str, on_bad: str) -> None:
  """Stops at a bad image (`on_bad` error) or lists it in the summary (skip)."""
  if on_bad == "error":
    raise PrepareError(f"{reason} (rerun with --on-bad skip to skip and list bad files)")
  summary.bad[image_id] = reason


# --------------------------------------------------------------------------- other sources

INDEX_NAME = "index.csv"  # a prepared folder of any source: one row per image
BOXES_NAME = "boxes.csv"
MASKS_NAME = "masks.csv"
INDEX_COLUMNS = ("image_id", "file", "patient", "split")
BOX_COLUMNS = ("image_id", "class", "x", "y", "w", "h")
MASK_COLUMNS = ("image_id", "class", "EncodedPixels")
OPTION_FIELDS = ("uncertain", "blank", "views", "readers", "seed", "val_fraction")
_CONFIG_FIELD = {"seed": "data.split_seed", "val_fraction": "data.val_fraction"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_UNKNOWN = index.LabelPolicy(uncertain=np.nan, blank=np.nan)  # a blank cell reads as NaN


def is_prepared_source(marker: dict) -> bool:
  """A folder `prepare --source S` wrote for a source other than NIH (`INDEX_NAME`)."""
  return marker.get("kind") == "prepared" and marker.get("source", "nih") != "nih"


def stored_name(image_id: str) -> str:
  """The PNG file name of an image id under images/: folders joined by '__', the image
  suffix replaced by .png; an id too long for a file name gets its SHA-1."""
  name = image_id.replace("\\", "/").strip("/").replace("/", "__")
  stem, suffix = os.path.splitext(name)
  name = (stem if suffix.lower() in _IMAGE_SUFFIXES else name) + ".png"
  if len(name.encode("utf-8", "surrogateescape")) > nih.NAME_MAX:
    name = hashlib.sha1(image_id.encode("utf-8", "surrogateescape")).hexdigest() + ".png"
  return name


def _stored_names(found: index.SourceIndex) -> list[str]:
  names = [stored_name(i) for i in found.image_ids]
  first: dict[str, str] = {}
  for image_id, name in zip(found.image_ids, names, strict=True):
    if first.setdefault(name, image_id) != image_id:
      raise PrepareError(f"{found.root}: images {first[name]} and {image_id} would both be "
                         f"stored as images/{name}")
  return names


def _label_cell(v: float) -> str:
  return "" if math.isnan(v) else "1" if v == 1 else "0"


def _scaled(found: index.SourceIndex, shapes: dict[int, tuple[int, int]], size: int):
  """Boxes of the kept rows in pixels of the size x size images (x by size / W, y by
  size / H of each image's decoded shape)."""
  out = []
  for j, row in enumerate(found.box_rows.tolist()):
    if row in shapes:
      h, w = shapes[row]
      x, y, bw, bh = found.box_xywh[j].tolist()
      box = (x * size / w, y * size / h, bw * size / w, bh * size / h)
      out.append((row, int(found.box_classes[j]), box))
  return out


def _masks(found: index.SourceIndex, shapes: dict, size: int) -> list[tuple[int, int, str]]:
  """(row, class, run-length code at size x size) of each kept row's mask (SIIM-ACR): the
  union of its components, resized with the image (area, then >= half covered)."""
  from lsemil.data import siim

  height, width = found.image_size or (siim.ORIGINAL_SIZE, siim.ORIGINAL_SIZE)
  out = []
  for row, per_class in sorted(found.masks.items()):
    if row not in shapes:
      continue
    for k, codes in sorted(per_class.items()):
      union = np.zeros((height, width), np.uint8)
      for code in codes:
        union |= siim.decode_rle(code, height, width).astype(np.uint8)
      small = cv2.resize(union * 255, (size, size), interpolation=cv2.INTER_AREA) >= 128
      out.append((row, k, siim.encode_rle(small)))
  return out


def _csv_text(header: Sequence[str], rows) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  return buf.getvalue()


def write_source_metadata(
  found: index.SourceIndex, out: Path, names: list[str], shapes: dict, *, size: int,
  bad: dict[str, str], options: index.Options,
) -> None:
  """index.csv (kept rows: id, file, patient, split, one column per class: 1, 0 or blank
  for unknown), boxes.csv and masks.csv in pixels of the stored images, bad_files.txt, and
  the marker last."""
  kept = [r for r in range(len(found)) if found.image_ids[r] not in bad]
  rows = [[found.image_ids[r], f"images/{names[r]}", found.patient_ids[r], found.splits[r],
           *map(_label_cell, found.labels[r].tolist())] for r in kept]
  _write_text_atomic(out / INDEX_NAME, _csv_text([*INDEX_COLUMNS, *found.classes], rows))
  for name, header, items in (
    (BOXES_NAME, BOX_COLUMNS, [(r, k, *map(_fmt, box)) for r, k, box in _scaled(found, shapes,
                                                                                 size)]),
    (MASKS_NAME, MASK_COLUMNS, _masks(found, shapes, size)),
  ):
    if items:
      table = [[found.image_ids[r], found.classes[k], *rest] for r, k, *rest in items]
      _write_text_atomic(out / name, _csv_text(header, table))
    else:
      (out / name).unlink(missing_ok=True)
  _write_bad_files(out, bad)
  marker = {
    "kind": "prepared", "format": "png", "image_size": size, "box_space": size,
    "source": found.source, "classes": list(found.classes),
    "official_split": bool(found.official_split),
    "options": {f: getattr(options, f) for f in OPTION_FIELDS}, "images": len(kept),
    "prepared_from": "synthetic" if nih.read_marker(found.root).get("kind") == "synthetic"
    else found.source,
  }
  _write_text_atomic(out / MARKER_NAME, json.dumps(marker, indent=2) + "\n")


def write_source_images(
  found: index.SourceIndex, images_dir: Path, names: list[str], *, size: int, on_bad: str,
  workers: int | None, progress: log.Progress | None,
) -> tuple[Summary, dict[int, tuple[int, int]]]:
  """Decodes (DICOM, JPEG, PNG), resizes and writes every image of `found` (parallel,
  resumable); returns the summary and the source (H, W) of each kept row that has boxes
  or masks (read again for an image a previous run wrote)."""
  images_dir.mkdir(parents=True, exist_ok=True)
  summary = Summary(total=len(found), stale_temp_removed=_clean_temp(images_dir),
                    dropped_from=INDEX_NAME)
  start = time.perf_counter()
  located = set(found.box_rows.tolist()) | set(found.masks)
  missing = set(found.missing)
  todo, shapes, existed = [], {}, set()
  for row, image_id in enumerate(found.image_ids):
    dst = images_dir / names[row]
    if dst.is_file():
      summary.already_done += 1
      if row not in located:
        continue
      existed.add(row)  # decoded again for its shape
    src = None if image_id in missing else found.image_paths[row]
    todo.append((row, src, str(dst), size))
  with _parallel(_convert_star, todo, workers) as results:
    for row, src, reason, shape in log.tracked(results, progress, "prepare", len(todo)):
      if reason is None:
        shapes[row] = shape
        summary.written += row not in existed
        continue
      if src is None:
        reason = f"{found.image_paths[row]}: file not found"
      _bad(summary, found.image_ids[row], reason, on_bad)
  summary.seconds = time.perf_counter() - start
  return summary, shapes


def prepare_source(
  source: str, data_dir: Path, out: Path, *, size: int, on_bad: str, workers: int | None,
  options: index.Options, progress: log.Progress | None = None,
) -> Summary:
  """Prepares a folder of any source but NIH into `out` (`INDEX_NAME` format)."""
  from lsemil.data import sources

  found = sources.load(source, data_dir, **dataclasses.asdict(options))
  names = _stored_names(found)
  summary, shapes = write_source_images(found, out / "images", names, size=size,
                                        on_bad=on_bad, workers=workers, progress=progress)
  write_source_metadata(found, out, names, shapes, size=size, bad=summary.bad, options=options)
  return summary


def _check_options(root: Path, marker: dict, asked: dict) -> None:
  """Refuses options (None: any) other than those the folder was prepared with."""
  saved = marker.get("options", {})
  for name, value in asked.items():
    if value is not None and saved.get(name) != value:
      field = _CONFIG_FIELD.get(name, f"data.{name}")
      raise DataError(
        f"{root / MARKER_NAME}: prepared with {name}={saved.get(name)!r}, but the run asks "
        f"for {value!r} ({field}); prepare again with the run's options or set {field}"
      )


def read_prepared(root: Path, marker: dict) -> index.SourceIndex:
  """The index of a folder `prepare_source` wrote: labels as written (blank = NaN), boxes
  and masks in pixels of its `image_size` images. Bad rows raise naming file and line."""
  path = root / INDEX_NAME
  header, rows = index.table_rows(path, required=INDEX_COLUMNS)
  classes = tuple(c for c in header if c not in INDEX_COLUMNS)
  if list(classes) != list(marker.get("classes", ())):
    raise DataError(f"{path}:1: class columns {list(classes)} differ from the classes of "
                    f"{root / MARKER_NAME}: {marker.get('classes')}")
  side = int(marker["image_size"])
  columns: dict[str, list] = {"ids": [], "paths": [], "patients": [], "splits": [], "labels": []}
  row_of: dict[str, int] = {}
  for at, row in rows:
    if row["split"] not in index.SPLITS or row["image_id"] in row_of:
      raise DataError(f"{at}: bad split {row['split']!r} or repeated image {row['image_id']}")
    row_of[row["image_id"]] = len(columns["ids"])
    columns["ids"].append(row["image_id"])
    columns["paths"].append(os.path.join(root, row["file"]))
    columns["patients"].append(row["patient"])
    columns["splits"].append(row["split"])
    columns["labels"].append(_UNKNOWN.row([row[c] for c in classes], at, classes))
  boxes, masks = [], {}
  for name, header in ((BOXES_NAME, BOX_COLUMNS), (MASKS_NAME, MASK_COLUMNS)):
    if not (root / name).is_file():
      continue
    for at, row in index.table_rows(root / name, required=header)[1]:
      if row["image_id"] not in row_of or row["class"] not in classes:
        raise DataError(f"{at}: image {row['image_id']!r} or class {row['class']!r} is not in "
                        f"{INDEX_NAME}")
      r, k = row_of[row["image_id"]], classes.index(row["class"])
      if name == BOXES_NAME:
        boxes.append((r, k, index.xywh_box([row[c] for c in "xywh"], at, side)))
      else:
        masks.setdefault(r, {})[k] = (row["EncodedPixels"],)
  saved = marker.get("options", {})
  options = index.Options(**{f: saved[f] for f in OPTION_FIELDS if f in saved})
  box_arrays = (np.asarray([b[0] for b in boxes], np.int64),
                np.asarray([b[1] for b in boxes], np.int64),
                np.asarray([b[2] for b in boxes], np.float64).reshape(-1, 4))
  return index.build(str(marker["source"]), root, classes, columns, options,
                     official_split=bool(marker.get("official_split")), boxes=box_arrays,
                     masks=masks, image_size=(side, side))


def open_source_index(
  root: Path, source: str, *, val_fraction: float, split_seed: int,
  uncertain: str | None = None, blank: str | None = None, views: str | None = None,
  readers: str | None = None,
) -> index.SourceIndex:
  """The index of a folder of `source`: a prepared one (`read_prepared`, refusing another
  source or other options than it was prepared with) or the raw release
  (`lsemil.data.sources.load` with these options; None: the reader's default)."""
  from lsemil.data import sources

  marker = nih.read_marker(root)
  asked = {"uncertain": uncertain, "blank": blank, "views": views, "readers": readers,
           "seed": int(split_seed), "val_fraction": float(val_fraction)}
  if marker.get("kind") == "prepared":
    made = marker.get("source", "nih")
    if made != source:
      raise DataError(f"{root / MARKER_NAME}: prepared from source {made!r}, not {source!r} "
                      f"(set data.source={made}, or --source {made})")
    _check_options(root, marker, asked)
    return read_prepared(root, marker)
  return sources.load(source, root, **{k: v for k, v in asked.items() if v is not None})


# --------------------------------------------------------------------------- entry points


def _check_resume(out: Path, settings: dict) -> None:
  """Refuses to resume into a folder started (or finished) with other settings."""
  for name in (STATE_NAME, MARKER_NAME):
    path = out / name
    if not path.is_file():
      continue
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in ("format", "image_size", "source"):
      if key in old and old[key] != settings[key]:
        raise PrepareError(
          f"{path}: {out} was prepared with {key}={old[key]!r}, not {settings[key]!r}; "
          f"use another --out"
        )


def prepare(
  nih_dir: str | os.PathLike,
  out: str | os.PathLike,
  *,
  fmt: str = "png",
  size: int = DEFAULT_SIZE,
  on_bad: str = "error",
  workers: int | None = None,
  val_fraction: float = nih.VALID_FRACTION,
  split_seed: int = 0,
  progress: log.Progress | None = None,
  source: str = "nih",
  policies: dict[str, str] | None = None,
) -> Summary:
  """Prepares `nih_dir` (a folder of `source`) into `out` (see the module docstring);
  returns the summary. `policies`: the `index.Options` label policies of a source other
  than NIH (uncertain, blank, views, readers), applied here and recorded in the marker."""
  nih_dir, out = Path(nih_dir), Path(out)
  if fmt not in ("png", "tfds"):
    raise ValueError(f"format must be 'png' or 'tfds', got {fmt!r}")
  if source != "nih" and fmt != "png":
    raise PrepareError(f"--format {fmt}: only NIH folders are prepared as TFDS so far; "
                       f"use --format png for source {source}")
  if on_bad not in ("error", "skip"):
    raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
  if size < 8:
    raise ValueError(f"size must be at least 8, got {size}")
  if nih_dir.resolve() == out.resolve():
    raise ValueError("--out must differ from --nih-dir")
  out.mkdir(parents=True, exist_ok=True)
  settings = {"format": fmt, "image_size": size, "source": source}
  _check_resume(out, settings)
  (out / STATE_NAME).write_text(json.dumps(settings) + "\n", encoding="utf-8")
  nih_extra = {"source": "nih", "classes": list(nih.CLASSES), "prepared_from": origin(nih_dir)}

  if source != "nih":
    options = index.Options(seed=split_seed, val_fraction=val_fraction, **(policies or {}))
    summary = prepare_source(source, nih_dir, out, size=size, on_bad=on_bad, workers=workers,
                             options=options, progress=progress)
  elif fmt == "png":
    summary = write_images(
      nih_dir, out / "images", size=size, on_bad=on_bad, workers=workers, progress=progress
    )
    write_metadata(nih_dir, out, size=size, fmt="png", bad=summary.bad, extra=nih_extra)
  else:
    from lsemil.data import tfds_builder

    staging = out / STAGING_NAME
    summary = write_images(
      nih_dir, staging / "images", size=size, on_bad=on_bad, workers=workers, progress=progress
    )
    write_metadata(nih_dir, staging, size=size, fmt="png", bad=summary.bad, extra={})
    tfds_builder.build(
      staging,
      out / "tfds",
      size=size,
      val_fraction=val_fraction,
      split_seed=split_seed,
      workers=workers,
    )
    extra = {**nih_extra, "val_fraction": val_fraction, "split_seed": split_seed}
    write_metadata(nih_dir, out, size=size, fmt="tfds", bad=summary.bad, extra=extra)
    shutil.rmtree(staging)
  (out / STATE_NAME).unlink(missing_ok=True)
  return summary
