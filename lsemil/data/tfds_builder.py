"""TFDS dataset `nih_chest_xray14`: NIH ChestX-ray14 resized for the paper (Sec 4.1, 4.2).

An array_record dataset readable with `tfds.data_source` (no TensorFlow anywhere): images
are stored as PNG bytes in an object `Tensor` feature, because `tfds.features.Image` needs
TensorFlow to encode and decode. Records: `image_id` (bytes), `png` (bytes of a
size x size 8-bit grayscale PNG), `labels` (uint8 (14,) multi-hot, order `nih.CLASSES`).

One TFDS split per index split (`train`, `valid`, `test`), each in index (Data_Entry) order
(`disable_shuffling=True`), so record i of split s is row `index.rows(s)[i]` of
`load_index` with the same `val_fraction` / `split_seed` (kept in the prepared folder's
marker). The manual dir is any NIH-layout folder: raw images are decoded and resized on the
fly; images that are already size x size 8-bit gray PNGs (a `prepare` staging folder) are
copied byte for byte.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lsemil.core.errors import ImageError
from lsemil.data import imageio, nih

NAME = "nih_chest_xray14"
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass
class NihConfig(tfds.core.BuilderConfig):
  """Output side and the validation split (Sec 4.1) the TFDS splits are cut with."""

  size: int = 512
  val_fraction: float = nih.VALID_FRACTION
  split_seed: int = 0


def config_name(size: int, val_fraction: float, split_seed: int) -> str:
  return f"s{size}_v{round(val_fraction * 1000):03d}_seed{split_seed}"


def make_config(
  size: int = 512, val_fraction: float = nih.VALID_FRACTION, split_seed: int = 0
) -> NihConfig:
  return NihConfig(
    name=config_name(size, val_fraction, split_seed),
    description=f"{size}x{size} 8-bit PNG bytes; valid = {val_fraction:g} of train_val patients",
    size=size,
    val_fraction=val_fraction,
    split_seed=split_seed,
  )


def _encode_row(args) -> tuple[bytes | None, str | None]:
  """(PNG bytes, None) or (None, reason): raw bytes when already in the output format."""
  src, size = args
  try:
    if src is None:
      raise ImageError("source image not found")
    data = Path(src).read_bytes()
    if data.startswith(imageio.PNG_SIGNATURE) and imageio.png_header(data) == (size, size, 8, 0):
      imageio.decode_png(data, src)  # still validate: a truncated file must not pass
      return data, None
    img = imageio.resize_gray(imageio.decode_png(data, src), size)
    return imageio.encode_png(img), None
  except (ImageError, OSError) as e:
    return None, f"{src}: {e}" if src and str(src) not in str(e) else str(e)


class NihChestXray14(tfds.core.GeneratorBasedBuilder):
  """NIH ChestX-ray14 as size x size PNG bytes, one split per index split."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "PNG bytes in an object Tensor feature; train/valid/test splits."}
  BUILDER_CONFIGS = [make_config()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download NIH ChestX-ray14 (https://nihcc.app.box.com/v/ChestXray-NIHCC) and pass its "
    "folder (Data_Entry CSV, list files, images/ or images_0NN/images/) as the manual dir; "
    "`lsemil prepare --format tfds` does this for you."
  )

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports `importlib_resources` (not installed) for packages.
    return epath.Path(__file__)

  def __init__(self, *, workers: int = 1, **kwargs):
    self._workers = max(1, int(workers))
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image_id": tfds.features.Tensor(shape=(), dtype=np.object_),
          "png": tfds.features.Tensor(shape=(), dtype=np.object_),
          "labels": tfds.features.Tensor(shape=(nih.NUM_CLASSES,), dtype=np.uint8),
        }
      ),
      disable_shuffling=True,
      homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
    )

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    cfg = self.builder_config
    index = nih.open_index(root, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    return {s: self._generate_examples(index, index.rows(s)) for s in SPLITS}

  def _generate_examples(self, index, rows):
    size = self.builder_config.size
    args = [(_src(index, r), size) for r in rows]
    pool = None
    if self._workers > 1 and len(args) > 1:
      pool = multiprocessing.get_context("spawn").Pool(self._workers)
      results = pool.imap(_encode_row, args, chunksize=8)
    else:
      results = map(_encode_row, args)
    try:
      for i, (row, (data, reason)) in enumerate(zip(rows, results, strict=True)):
        if data is None:
          raise nih.DataError(reason)
        yield (
          i,
          {
            "image_id": index.image_ids[row].encode(),
            "png": data,
            "labels": np.asarray(index.labels[row], np.uint8),
          },
        )
    finally:
      if pool is not None:
        pool.terminate()
        pool.join()


def _src(index, row: int) -> str | None:
  p = index.image_paths[row]
  return None if p is None else str(p)


def build(
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike,
  *,
  size: int = 512,
  val_fraction: float = nih.VALID_FRACTION,
  split_seed: int = 0,
  workers: int | None = None,
) -> Path:
  """Builds (or reuses, if complete) the dataset under data_dir; returns its version dir.

  TFDS writes into an `incomplete.*` folder and renames it when done, so an interrupted
  build is never mistaken for a finished one; a rerun starts that build over.
  """
  tfds.disable_progress_bar()
  config = make_config(size, val_fraction, split_seed)
  if config.name in {c.name for c in NihChestXray14.BUILDER_CONFIGS}:
    config = config.name  # TFDS refuses an object named like a registered config
  builder = NihChestXray14(
    data_dir=str(data_dir),
    config=config,
    file_format="array_record",
    workers=(os.cpu_count() or 1) if workers is None else workers,
  )
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return Path(builder.data_dir)


def dataset_dir(prepared_dir: str | os.PathLike) -> Path:
  """The version folder of the one TFDS build inside a prepared folder."""
  found = sorted(Path(prepared_dir, "tfds", NAME).glob("*/*/dataset_info.json"))
  if len(found) != 1:
    raise nih.DataError(
      f"{prepared_dir}: expected one TFDS build under tfds/{NAME}/, found {len(found)}"
    )
  return found[0].parent


def data_sources(prepared_dir: str | os.PathLike) -> dict:
  """{split: tfds data source} of a prepared tfds folder (reads without the builder class)."""
  builder = tfds.builder_from_directory(str(dataset_dir(prepared_dir)))
  return {s: builder.as_data_source(split=s) for s in SPLITS}
