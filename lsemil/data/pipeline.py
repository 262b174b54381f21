"""grain input pipelines for training and evaluation (paper Sec 4.2).

Sources: `open_source(data_dir, split, source=..., **options)` reads one split of any prepared
folder (`lsemil prepare`, png or tfds), a synthetic folder, or the raw release of any source
of `lsemil.data.sources` (decoded, DICOM included, and resized to 512 on the fly, slower);
`options_of(config)` gives its keywords from a run's config, `open_index` the whole folder's
index. Records are dict(image=uint8 (H, W), labels=float32 (C,), row=int index row), the
labels in the source's class order (`ImageSource.classes`) with NaN where a label is unknown
(uncertain or blank under the `ignore` policies): the loss masks them
(`lsemil.training.objective`), evaluation takes each class's AUC where it is known.

Training (`make_train_iter`): per-epoch shuffle by `config.seed`, then the augmentation of
Sec 4.2 as ONE affine warp (`cv2.warpAffine`, bilinear, black border) that also resamples to
the model input side S = `config.model.input_size`:

- rotation by an angle uniform in [-rotation_deg, rotation_deg] degrees (paper: 25);
- translation uniform in [-translation_px, translation_px] in each of x and y, in pixels of
  a 512x512 image (paper: 50), i.e. a fraction translation_px / 512 of the side whatever
  the stored or input side;
- zoom by a factor uniform in `zoom_range` (> 1 magnifies). The paper writes "[0.25, 0.75]",
  which we read as +-25%, the default (0.75, 1.25) (see configs/paper.py).

Downscaling by more than 2x (e.g. 512 -> 128 for the demo model) first shrinks the image
with INTER_AREA so the warp never aliases. Batches carry images as uint8 (B, S, S, 1); the
model scales them to [0, 1] on the device, so the host never converts to float and sends a
quarter of the bytes (lsemil.models.mil.MultiResolutionMIL accepts uint8 or float input).
Augmentations derive from (seed, global element index), so they are reproducible, differ
between epochs, and do not depend on the number of threads or worker processes.

Multi-host: each process takes every `process_count`-th element of the one global shuffled
stream, so together the processes see each example once per epoch; batches are
`batch_size // process_count` per process. The iterator is a grain `DatasetIterator`:
`get_state()` / `set_state()` resume at the exact next batch (see lsemil.runtime.checkpointing).

Evaluation (`make_eval_iter`): no augmentation, index order, the last global batch padded with
zero images whose `mask` is False and `row` is -1, so every example is counted exactly once.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import cv2
import grain
import numpy as np

from lsemil.core import log
from lsemil.data import imageio, index, nih, preparation, sources

PAPER_SIDE = 512  # translation_px is in pixels of a 512x512 image (Sec 4.2)
POLICIES = ("uncertain", "blank", "views", "readers")  # config.data fields of index.Options


# --------------------------------------------------------------------------- sources


class ImageSource:
  """Random-access source over one split: grain's RandomAccessDataSource protocol.

  `classes` (the source's class names, the model's output order), `rows` (rows of the
  folder's index, `open_index`), `labels` float32 (n, C) in `classes` order with NaN where a
  label is unknown, `image_ids`, `patient_ids` (str). Element i is dict(image=uint8 (H, W),
  labels=float32 (C,), row=int). Holds only plain arrays and paths (no index object), so it
  pickles into grain workers.
  """

  def __init__(
    self,
    data_dir: str | os.PathLike,
    split: str,
    *,
    source: str = "nih",
    val_fraction: float = nih.VALID_FRACTION,
    split_seed: int = 0,
    **policies: str | None,
  ):
    nih.require_local(data_dir)
    self.data_dir = Path(data_dir)
    self.split = split
    self.source = source
    self.paths: list[str] = []
    self._tfds_split: list[tuple[str, int]] = []
    self._tfds = None
    marker = nih.read_marker(self.data_dir)
    if source == "nih" and not preparation.is_prepared_source(marker):
      self._open_nih(marker, val_fraction, split_seed)
      return
    found = _folder_index(self.data_dir, source, val_fraction, split_seed, policies)
    rows = found.rows(split)
    self.rows = rows.astype(np.int64)
    self.classes = found.classes
    self.labels = np.asarray(found.labels, np.float32)[rows]
    self.image_ids = [found.image_ids[r] for r in rows]
    self.patient_ids = [str(found.patient_ids[r]) for r in rows]
    self.format = "png"
    self.raw = not preparation.is_prepared_source(marker)
    self.paths = [found.image_paths[r] for r in rows]
    missing = sorted(set(found.missing) & set(self.image_ids))
    if missing:
      raise nih.DataError(
        f"{self.data_dir}: {len(missing)} images of split {split!r} have no file "
        f"(first: {missing[0]})"
      )
    if self.raw:
      log.warning(
        f"{self.data_dir}: reading raw {source} images (decode + resize per step); run "
        f"`lsemil prepare --source {source}` once for a faster input pipeline"
      )

  def _open_nih(self, marker: dict, val_fraction: float, split_seed: int) -> None:
    """The NIH folder (raw, synthetic, or prepared as png or tfds), as before other sources."""
    nih_index = nih.open_index(self.data_dir, val_fraction=val_fraction, split_seed=split_seed)
    rows = nih_index.rows(self.split)
    self.rows = rows.astype(np.int64)
    self.classes = nih.CLASSES
    self.labels = np.asarray(nih_index.labels, np.float32)[rows]
    self.image_ids = [nih_index.image_ids[r] for r in rows]
    self.patient_ids = [str(nih_index.patient_ids[r]) for r in rows]
    self.format = marker.get("format", "png") if marker.get("kind") == "prepared" else "png"
    # Raw NIH images (no marker) are brought to 512 here, as `prepare` would.
    self.raw = not marker.get("kind")
    if self.format == "tfds":
      self._map_tfds(marker, nih_index, val_fraction, split_seed)
    else:
      paths = [nih_index.image_paths[r] for r in rows]
      missing = [self.image_ids[i] for i, p in enumerate(paths) if p is None]
      if missing:
        raise nih.DataError(
          f"{self.data_dir}: {len(missing)} images of split {self.split!r} have no file under "
          f"images/ (first: {missing[0]})"
        )
      self.paths = [str(p) for p in paths]
      if self.raw:
        log.warning(
          f"{self.data_dir}: reading raw NIH images (decode + resize per step); run "
          "`lsemil prepare` once for a faster input pipeline"
        )

  def _map_tfds(self, marker: dict, nih_index, val_fraction: float, split_seed: int) -> None:
    """Maps each row of this split to (tfds split, record) of the prepare-time splits."""
    vf = float(marker.get("val_fraction", nih.VALID_FRACTION))
    ss = int(marker.get("split_seed", 0))
    if (vf, ss) == (val_fraction, split_seed):
      built = nih_index
    else:
      built = nih.open_index(self.data_dir, val_fraction=vf, split_seed=ss)
    where = {}
    for s in ("train", "valid", "test"):
      for pos, r in enumerate(built.rows(s)):
        where[built.image_ids[r]] = (s, pos)
    self._tfds_split = [where[i] for i in self.image_ids]

  def _sources(self):
    if self._tfds is None:
      from lsemil.data import tfds_builder

      self._tfds = tfds_builder.data_sources(self.data_dir)
    return self._tfds

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_tfds"] = None  # reopened lazily in each worker
    return state

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if self.format == "tfds":
      s, pos = self._tfds_split[i]
      rec = self._sources()[s][pos]
      image_id = rec["image_id"]
      image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
      name = f"{self.data_dir}/tfds[{s}][{pos}]"
      if image_id != self.image_ids[i]:
        raise nih.DataError(f"{name}: holds {image_id}, expected {self.image_ids[i]}")
      image = imageio.decode_png(rec["png"], f"{name} ({image_id})")
    elif self.source == "nih":
      image = imageio.read_gray(self.paths[i])
    else:
      image = preparation.read_image(self.paths[i])  # DICOM, JPEG or PNG
    if self.raw:
      image = prepared_image(image)
    return {"image": image, "labels": self.labels[i], "row": int(self.rows[i])}

  def __repr__(self) -> str:
    return (f"ImageSource({self.data_dir}, {self.source}, split={self.split!r}, n={len(self)}, "
            f"{self.format})")


@functools.lru_cache(maxsize=4)
def _cached_index(root: str, source: str, key: tuple, stamp) -> index.SourceIndex:
  del stamp  # only part of the cache key
  return preparation.open_source_index(Path(root), source, **dict(key))


def _folder_index(root: Path, source: str, val_fraction: float, split_seed: int,
                  policies: dict) -> index.SourceIndex:
  """`preparation.open_source_index`, read once per folder, source and options (the
  splits of one run share it)."""
  key = (("val_fraction", float(val_fraction)), ("split_seed", int(split_seed)),
         *sorted(policies.items()))
  return _cached_index(str(root), source, key, _stamp(root))


@functools.lru_cache(maxsize=16)
def _cached_source(data_dir: str, split: str, key: tuple, stamp):
  del stamp  # only part of the cache key
  return ImageSource(data_dir, split, **dict(key))


def _stamp(data_dir: Path) -> tuple:
  """Modification times of the folder's metadata: a re-prepared folder is re-read."""
  return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in data_dir.iterdir() if p.is_file()))


def _local_root(data_dir: str | os.PathLike) -> Path:
  nih.require_local(data_dir)
  root = Path(data_dir).resolve()
  if not root.is_dir():
    raise nih.DataError(f"{root}: not a folder")
  return root


def open_source(
  data_dir: str | os.PathLike,
  split: str,
  *,
  source: str = "nih",
  val_fraction: float = nih.VALID_FRACTION,
  split_seed: int = 0,
  uncertain: str | None = None,
  blank: str | None = None,
  views: str | None = None,
  readers: str | None = None,
) -> ImageSource:
  """A random-access source over one split (train / valid / test) of a dataset folder of
  any source (`lsemil.data.sources.READERS`), on local disk (a gs:// or other URL raises
  DataError). Evaluation, validation and training read every split through here.

  `data_dir` is a `lsemil prepare` output (png or tfds; it records its source, classes,
  label matrix, split and policies) or the raw release of `source` (images decoded and
  resized to 512 on the fly, DICOM included). `val_fraction` and `split_seed` cut the
  patient-wise splits; `uncertain`, `blank`, `views`, `readers` are the label policies of
  `lsemil.data.index.Options` (None: the reader's default, or whatever a prepared folder
  was prepared with). A prepared folder of another source, or prepared with other policies
  or another split than asked for, raises DataError naming the field. `options_of(config)`
  gives all these keywords from a run's config.

  The result has `.classes` (the source's class names: the label columns and the model's
  output order), `.labels` float32 (n, C) with NaN where a class is unknown (so a class's
  AUC can be taken over the images where it is known), `.rows` (rows of `open_index`),
  `.image_ids` and `.patient_ids`.
  """
  root = _local_root(data_dir)
  key = (("source", str(source)), ("val_fraction", float(val_fraction)),
         ("split_seed", int(split_seed)), ("uncertain", uncertain), ("blank", blank),
         ("views", views), ("readers", readers))
  return _cached_source(str(root), split, key, _stamp(root))


def open_index(
  data_dir: str | os.PathLike,
  *,
  source: str = "nih",
  val_fraction: float = nih.VALID_FRACTION,
  split_seed: int = 0,
  **policies: str | None,
) -> index.SourceIndex:
  """The whole folder's index (every split; boxes, masks, ids, patients), whose rows
  `open_source(...).rows` and the eval batches' `row` refer to; keywords as `open_source`.
  Boxes of a prepared folder are in pixels of its stored images."""
  root = _local_root(data_dir)
  if source == "nih" and not preparation.is_prepared_source(nih.read_marker(root)):
    return sources.from_nih(nih.open_index(root, val_fraction=val_fraction,
                                           split_seed=split_seed))
  return _folder_index(root, source, val_fraction, split_seed, policies)


def options_of(config) -> dict:
  """`open_source` / `open_index` keywords of a run's config (`config.data`): the source,
  the split and the label policies; an old config without `data.source` reads NIH."""
  data = config.data
  out = {"source": str(data.get("source") or "nih"), "val_fraction": float(data.val_fraction),
         "split_seed": int(data.split_seed)}
  for name in POLICIES:
    out[name] = data.get(name)
  return out


# --------------------------------------------------------------------------- the input contract


def prepared_image(image: np.ndarray) -> np.ndarray:
  """A decoded raw image -> what `lsemil prepare` stores (Sec 4.2): larger than 512 px,
  resized to 512 x 512 (anti-aliased, as skimage); 512 or smaller, kept as it is."""
  if max(image.shape) > nih.PREPARED_SIZE or image.shape[0] != image.shape[1]:
    return imageio.resize_gray(image, nih.PREPARED_SIZE)
  return image


def eval_image(image: np.ndarray, out_size: int) -> np.ndarray:
  """THE evaluation input contract: a decoded uint8 grey image of any size (a stored image
  of a dataset folder, or any file `predict` reads) -> the uint8 (S, S) model input.

  `prepared_image` first (a prepared folder's images already are), then one unaugmented
  warp to the model side S. The model takes uint8 (B, S, S, 1) and scales it to [0, 1] on
  the device. Evaluation, validation, reproduce and predict all go through this function.
  """
  return warp(prepared_image(image), int(out_size))


# --------------------------------------------------------------------------- transforms


def affine_matrix(
  in_hw: tuple[int, int],
  out_size: int,
  *,
  angle_deg: float = 0.0,
  zoom: float = 1.0,
  shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
  """2x3 forward map source pixel -> output pixel: centre to centre, resample to out_size,
  then zoom, rotate (counter-clockwise on screen) and shift by `shift` output pixels."""
  h, w = in_hw
  to_origin = np.array([[1, 0, -(w - 1) / 2], [0, 1, -(h - 1) / 2], [0, 0, 1]], np.float64)
  resample = np.diag([out_size / w, out_size / h, 1.0])
  t = math.radians(angle_deg)
  c, s = math.cos(t) * zoom, math.sin(t) * zoom
  rot_zoom = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]], np.float64)
  centre = (out_size - 1) / 2
  back = np.array([[1, 0, centre + shift[0]], [0, 1, centre + shift[1]], [0, 0, 1]], np.float64)
  return (back @ rot_zoom @ resample @ to_origin)[:2]


def warp(
  image: np.ndarray,
  out_size: int,
  *,
  angle_deg: float = 0.0,
  zoom: float = 1.0,
  shift: tuple[float, float] = (0.0, 0.0),
  min_zoom: float = 1.0,
) -> np.ndarray:
  """uint8 (H, W) -> uint8 (out_size, out_size) through one affine warp.

  If the smallest scale this pipeline can draw (out/H * min_zoom) shrinks by more than 2x,
  the image is first shrunk to out_size with INTER_AREA (anti-aliasing).
  """
  h, w = image.shape
  if out_size / max(h, w) * min_zoom < 0.5:
    image = cv2.resize(image, (out_size, out_size), interpolation=cv2.INTER_AREA)
    h, w = image.shape
  if (h, w) == (out_size, out_size) and angle_deg == 0 and zoom == 1 and shift == (0.0, 0.0):
    return image
  m = affine_matrix((h, w), out_size, angle_deg=angle_deg, zoom=zoom, shift=shift)
  return cv2.warpAffine(
    image,
    m,
    (out_size, out_size),
    flags=cv2.INTER_LINEAR,
    borderMode=cv2.BORDER_CONSTANT,
    borderValue=0,
  )


def _add_channel(batch: dict) -> dict:
  """uint8 (B, S, S) -> uint8 (B, S, S, 1) (NHWC); scaling to [0, 1] happens in the model."""
  out = dict(batch)
  out["image"] = batch["image"][..., None]
  return out


class Augment(grain.transforms.RandomMap):
  """Sec 4.2 augmentation + resample to the model input side, one warp per image."""

  def __init__(
    self,
    out_size: int,
    *,
    rotation_deg: float = 25.0,
    translation_px: float = 50.0,
    zoom_range: tuple[float, float] = (0.75, 1.25),
    augment: bool = True,
  ):
    self.out_size = int(out_size)
    self.rotation_deg = float(rotation_deg)
    self.translation_px = float(translation_px)
    self.zoom_range = (float(zoom_range[0]), float(zoom_range[1]))
    self.augment = bool(augment)
    if not 0 < self.zoom_range[0] <= self.zoom_range[1]:
      raise ValueError(f"zoom_range must be 0 < lo <= hi, got {zoom_range}")

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    s = self.out_size
    if self.augment:
      angle = rng.uniform(-self.rotation_deg, self.rotation_deg)
      zoom = rng.uniform(*self.zoom_range)
      t = self.translation_px * s / PAPER_SIDE
      shift = (rng.uniform(-t, t), rng.uniform(-t, t))
      image = warp(
        element["image"], s, angle_deg=angle, zoom=zoom, shift=shift, min_zoom=self.zoom_range[0]
      )
    else:
      image = warp(element["image"], s)
    return {"image": image, "labels": element["labels"], "row": np.int32(element["row"])}


class _EvalElement(grain.transforms.Map):
  """Local eval position -> padded example (Sec 4.2 inputs, no augmentation)."""

  def __init__(self, source, out_size: int, global_batch: int, local_batch: int, offset: int):
    self.source, self.out_size = source, int(out_size)
    self.global_batch, self.local_batch, self.offset = global_batch, local_batch, offset

  def map(self, i: int) -> dict:
    i = int(i)
    g = (i // self.local_batch) * self.global_batch + self.offset + i % self.local_batch
    s = self.out_size
    if g >= len(self.source):
      return {
        "image": np.zeros((s, s), np.uint8),
        "labels": np.zeros(self.source.labels.shape[1], np.float32),
        "mask": np.False_,
        "row": np.int32(-1),
      }
    rec = self.source[g]
    return {
      "image": eval_image(rec["image"], s),
      "labels": rec["labels"],
      "mask": np.True_,
      "row": np.int32(rec["row"]),
    }


# --------------------------------------------------------------------------- pipelines


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(
      f"{what}={global_batch} must be a positive multiple of process_count={process_count}"
    )
  return global_batch // process_count


def _source_for(config, data_dir, split: str) -> ImageSource:
  return open_source(data_dir, split, **options_of(config))


def _read_options(config, local_batch: int) -> grain.ReadOptions:
  data = config.data
  # grain's default of 16 threads oversubscribes small hosts (measured on 2 cores: 2-4
  # threads gave ~10% more images/s than 16); cv2 releases the GIL, so 2 per core suffice.
  default_threads = max(2, min(grain.ReadOptions().num_threads, 2 * (os.cpu_count() or 1)))
  threads = int(data.read_threads) or default_threads
  # prefetch_buffer_size counts batches; ReadOptions counts elements.
  buffer = max(threads, int(data.prefetch_buffer_size) * local_batch)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)


def _maybe_workers(ds: grain.IterDataset, config) -> grain.IterDataset:
  workers = int(config.data.worker_count)
  if workers <= 0:
    return ds
  from absl import flags

  # grain reads an absl flag in its workers; outside an absl app they are unparsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  per_worker = max(1, int(config.data.prefetch_buffer_size))
  return ds.mp_prefetch(
    grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=per_worker)
  )


def train_dataset(
  config, data_dir, *, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """The infinite, shuffled, augmented, batched train IterDataset of one process."""
  local = _local_batch(int(config.train.batch_size), process_count, "train.batch_size")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  source = _source_for(config, data_dir, "train")
  if len(source) == 0:
    raise ValueError(f"{data_dir}: the train split is empty")
  data = config.data
  augment = Augment(
    int(config.model.input_size),
    rotation_deg=float(data.rotation_deg),
    translation_px=float(data.translation_px),
    zoom_range=tuple(data.zoom_range),
    augment=bool(data.augment),
  )
  ds = grain.MapDataset.source(source).seed(int(config.seed)).shuffle().repeat(None)
  ds = ds.random_map(augment)
  # Shard the global stream after the random map: augmentations stay tied to global indices.
  ds = ds[process_index::process_count]
  it = ds.to_iter_dataset(_read_options(config, local))
  it = it.batch(local, drop_remainder=True)
  return _maybe_workers(it, config).map(_add_channel)


def make_train_iter(config, data_dir, *, process_index: int = 0, process_count: int = 1):
  """A checkpointable grain DatasetIterator of dict(image=(B, S, S, 1) u8, labels=(B, C) f32
  (NaN = unknown), row=(B,) int32 index rows)."""
  return iter(
    train_dataset(config, data_dir, process_index=process_index, process_count=process_count)
  )


def make_eval_iter(
  config, data_dir, split: str, *, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """Batches dict(image, labels, mask, row) of one split in index order, padded and masked.

  Global batch b holds examples [b*G, (b+1)*G); process p takes its [p*B, (p+1)*B) part.
  All processes get the same number of batches (ceil(N / G)); padding has mask False, row -1.
  """
  global_batch = int(config.train.eval_batch_size)
  local = _local_batch(global_batch, process_count, "train.eval_batch_size")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  source = _source_for(config, data_dir, split)
  num_batches = math.ceil(len(source) / global_batch)
  element = _EvalElement(
    source, int(config.model.input_size), global_batch, local, process_index * local
  )
  ds = grain.MapDataset.range(num_batches * local).map(element)
  it = ds.to_iter_dataset(_read_options(config, local)).batch(local)
  return _maybe_workers(it, config).map(_add_channel)


def split_rows(config, data_dir, split: str) -> np.ndarray:
  """The index rows of one split, in the order `make_eval_iter` yields them."""
  return _source_for(config, data_dir, split).rows


def num_examples(data_dir, split: str, config) -> int:
  """Examples in one split (before padding or sharding)."""
  return len(_source_for(config, data_dir, split))


def steps_per_epoch(data_dir, config) -> int:
  """Train steps per epoch at the global batch size (drop_remainder; at least 1)."""
  return max(1, num_examples(data_dir, "train", config) // int(config.train.batch_size))
