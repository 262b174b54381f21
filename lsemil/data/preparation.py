"""`lsemil prepare`: an NIH folder -> a folder of size x size 8-bit PNGs or a TFDS dataset.

Sec 4.2 of the paper: "the inputs of 1024x1024 are downsampled with skimage.transform.resize
to 512x512". `lsemil.data.imageio.resize_gray` matches that resize to rounding at cv2 speed.

The output folder P is itself an NIH-layout folder, so `load_index(P)` works on it:

- `P/images/<image_id>`: size x size 8-bit grayscale PNGs (`--format png`), or
  `P/tfds/nih_chest_xray14/...`: an array_record TFDS dataset (`--format tfds`, see
  `lsemil.data.tfds_builder`);
- the Data_Entry CSV and the two split lists as found (rows of skipped images dropped),
  `BBox_List_2017.csv` with coordinates scaled to the output size, `bad_files.txt` when
  `--on-bad skip` skipped anything, and the marker `lsemil_dataset.json`
  {kind: prepared, format, image_size: size, box_space: size}.

Resumable: every image is written to a temporary name and renamed, so an image that exists
under its final name is complete; a second run skips those, and temporary files left by an
interrupted run are deleted, never trusted. The marker is written last.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import cv2

from lsemil.core import fileio, log
from lsemil.core.errors import ImageError, OutputError, PrepareError
from lsemil.data import imageio, nih

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
  bad_path = out / BAD_FILES_NAME
  if bad:
    lines = [f"{image_id}\t{reason}" for image_id, reason in sorted(bad.items())]
    _write_text_atomic(bad_path, "\n".join(lines) + "\n")
  elif bad_path.exists():
    bad_path.unlink()
  marker = {"kind": "prepared", "format": fmt, "image_size": size, "box_space": size, **extra}
  _write_text_atomic(out / MARKER_NAME, json.dumps(marker, indent=2) + "\n")


# --------------------------------------------------------------------------- images


def process_image(src: str | None, dst: str, size: int) -> str | None:
  """Decode + resize + write one image; returns None or the reason it is bad (the input's
  fault). Failing to write the output raises OutputError naming it."""
  try:
    if src is None:
      raise ImageError(f"{dst}: source image not found")
    img = imageio.resize_gray(imageio.read_gray(src), size)
  except ImageError as e:
    return str(e)
  except cv2.error as e:  # a decoder failure imageio's checks did not foresee
    return f"{src}: cannot decode ({str(e).strip().splitlines()[-1]})"
  try:
    imageio.write_png_atomic(Path(dst), imageio.encode_png(img))
  except OSError as e:
    raise OutputError(f"{dst}: cannot write ({e.strerror or e})") from None
  return None


def _process_star(args):
  image_id, src, dst, size = args
  return image_id, src, process_image(src, dst, size)


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
        f"were dropped from the copied Data_Entry and split lists (see {BAD_FILES_NAME}):"
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
      if on_bad == "error":
        raise PrepareError(f"{reason} (rerun with --on-bad skip to skip and list bad files)")
      summary.bad[image_id] = reason
      continue
    dst = images_dir / image_id
    if dst.is_file():
      summary.already_done += 1
      continue
    src = index.image_paths[row]
    todo.append((image_id, None if src is None else str(src), str(dst), size))
  workers = (os.cpu_count() or 1) if workers is None else workers
  pool = None
  try:
    if workers > 1 and len(todo) > 1:
      pool = multiprocessing.get_context("spawn").Pool(workers)
      results = pool.imap_unordered(_process_star, todo, chunksize=16)
    else:
      results = map(_process_star, todo)
    for image_id, src, reason in log.tracked(results, progress, "prepare", len(todo)):
      if reason is None:
        summary.written += 1
        continue
      if src is None:
        reason = f"{expected_image_path(nih_dir, image_id)}: file not found"
      if on_bad == "error":
        raise PrepareError(f"{reason} (rerun with --on-bad skip to skip and list bad files)")
      summary.bad[image_id] = reason
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
  summary.seconds = time.perf_counter() - start
  return summary


# --------------------------------------------------------------------------- entry points


def _check_resume(out: Path, settings: dict) -> None:
  """Refuses to resume into a folder started (or finished) with other settings."""
  for name in (STATE_NAME, MARKER_NAME):
    path = out / name
    if not path.is_file():
      continue
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in ("format", "image_size"):
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
) -> Summary:
  """Prepares `nih_dir` into `out` (see the module docstring); returns the summary."""
  nih_dir, out = Path(nih_dir), Path(out)
  if fmt not in ("png", "tfds"):
    raise ValueError(f"format must be 'png' or 'tfds', got {fmt!r}")
  if on_bad not in ("error", "skip"):
    raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
  if size < 8:
    raise ValueError(f"size must be at least 8, got {size}")
  if nih_dir.resolve() == out.resolve():
    raise ValueError("--out must differ from --nih-dir")
  out.mkdir(parents=True, exist_ok=True)
  settings = {"format": fmt, "image_size": size}
  _check_resume(out, settings)
  (out / STATE_NAME).write_text(json.dumps(settings) + "\n", encoding="utf-8")

  if fmt == "png":
    summary = write_images(
      nih_dir, out / "images", size=size, on_bad=on_bad, workers=workers, progress=progress
    )
    write_metadata(nih_dir, out, size=size, fmt="png", bad=summary.bad, extra={})
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
    extra = {"val_fraction": val_fraction, "split_seed": split_seed}
    write_metadata(nih_dir, out, size=size, fmt="tfds", bad=summary.bad, extra=extra)
    shutil.rmtree(staging)
  (out / STATE_NAME).unlink(missing_ok=True)
  return summary
