"""`lsemil.load(PATH)`: a trained model in one line, predicting through the one inference path.

  model = lsemil.load("runs/r0_5")        # a training workdir (its best checkpoint)
  model = lsemil.load("exported/")        # a folder of `lsemil export`
  out = model.predict(images)             # uint8 grey images -> probs (n, K), saliency
  model.classes                           # the K class names, from the checkpoint's config

PATH is anything `lsemil.inference.engine.load` reads: a training workdir (best or latest
checkpoint), its checkpoints/ folder, one step folder, or an exported folder. `predict` runs
`engine.Predictor.predict_images`, the call `lsemil predict` makes, so the probabilities are
the very numbers of `lsemil predict`'s CSV for the same pixels (tests/system/test_export_cli.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lsemil.data import findings
from lsemil.inference import engine


class TrainedModel:
  """A loaded model: `predict` images, read `classes`, `input_size`, `config`, `step`."""

  def __init__(self, loaded: engine.LoadedModel):
    self.loaded = loaded
    self._predictor: engine.Predictor | None = None

  def __repr__(self) -> str:
    return f"TrainedModel({self.loaded.checkpoint!r}, step {self.step})"

  @property
  def config(self):
    return self.loaded.config

  @property
  def step(self) -> int:
    return int(self.loaded.step)

  @property
  def classes(self) -> tuple[str, ...]:
    """The output columns' class names, as the checkpoint's config names them."""
    return findings.of_config(self.config)

  @property
  def input_size(self) -> int:
    return int(self.loaded.model.input_size)

  @property
  def predictor(self) -> engine.Predictor:
    """The model's `engine.Predictor` (built on first use, on all local devices)."""
    if self._predictor is None:
      self._predictor = engine.Predictor(self.loaded.model, self.loaded.variables)
    return self._predictor

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """A decoded uint8 (H, W) grey image of any size -> the uint8 (S, S, 1) model input
    (`engine.model_input`: what `lsemil predict` and evaluation do)."""
    return engine.model_input(np.asarray(image), self.input_size)

  def inputs(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (n, S, S, 1) model inputs as they are, or any uint8 (H, W) grey images (a
    sequence, an (n, H, W) array, or one (H, W) image) through `preprocess`."""
    if isinstance(images, np.ndarray) and images.ndim == 2:
      images = [images]
    s = self.input_size
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (s, s, 1):
      return images  # model inputs already (the forward refuses any dtype but uint8)
    if not len(images):
      return np.zeros((0, s, s, 1), np.uint8)
    return np.stack([self.preprocess(x) for x in images])

  def predict(
    self,
    images: np.ndarray | Sequence[np.ndarray],
    *,
    saliency: bool = True,
    batch_size: int = 16,
  ) -> dict[str, np.ndarray]:
    """{'probs': float32 (n, K), 'saliency': float32 (n, N, N, K) (with `saliency`)} of
    images (see `inputs`), K = len(classes).

    Batched as `lsemil predict` batches files (`lsemil.workflows.prediction.predict_files`):
    runs of `batch_size` images, the last run as long as what is left. XLA's float32 results
    can differ in the last bit between batch sizes; with the same `batch_size` (16 both) the
    numbers equal `lsemil predict`'s for the same files exactly.
    """
    x = self.inputs(images)
    batch = max(1, int(batch_size))
    parts = [
      self.predictor.predict_images(x[i : i + batch], len(x[i : i + batch]), saliency=saliency)
      for i in range(0, len(x), batch)
    ]
    if not parts:
      k, n = len(self.classes), int(self.loaded.model.saliency_size)
      empty = {"probs": np.zeros((0, k), np.float32)}
      return empty | ({"saliency": np.zeros((0, n, n, k), np.float32)} if saliency else {})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def load(path: str | os.PathLike, which: str = "best") -> TrainedModel:
  """A `TrainedModel` of a training workdir ('best' or 'latest' checkpoint), its
  checkpoints/ folder, a step folder, or a folder of `lsemil export`; local or gs://.
  Raises CheckpointError naming the path (non-finite or changed weights included)."""
  return TrainedModel(engine.load(path, which))
