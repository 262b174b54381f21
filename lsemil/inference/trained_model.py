"""`lsemil.load(PATH)`: a trained model in one line, predicting through the one inference path.

  import lsemil
  model = lsemil.load("lsemil_demo/export_r05")   # an export folder, or a training workdir
  result = model.predict("chest.png")             # a Prediction (a list for a list of images)
  result.top(3)                                   # [(class, probability)], highest first
  result.decisions, result.boxes                  # per class; boxes in the file's pixels
  result.saliency_map("Mass")                     # float32 (H, W) over the original image

PATH is anything `lsemil.inference.engine.load` reads: a training workdir (best or latest
checkpoint), its checkpoints/ folder, one step folder, or an exported folder. `predict` takes
file paths (read by `readout.read_image`, the guards and decoding of `lsemil predict`), numpy
arrays or PIL images (`readout.gray_of_array`), runs them through `engine.Predictor` in
`lsemil predict`'s batches with the run's saliency source, and decides and boxes them with
`readout.decisions` / `readout.boxes` and the thresholds and recalibration stored with the
checkpoint (`records`): the very numbers of `lsemil predict --boxes`'s CSV and boxes.json for
the same files (tests/system/test_load_api.py). `forward` is the bare forward on model inputs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from lsemil.core.errors import ImageError
from lsemil.data import findings
from lsemil.inference import engine, readout, records
from lsemil.metrics import calibration
from lsemil.models import registry

THRESHOLD = 0.5  # `lsemil predict --threshold`'s default: boxes for classes with p >= it
BOX_TAU = 0.5  # `lsemil predict --box-tau`'s default


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One image's findings, as `lsemil predict --boxes` writes them for its file.

  source: the file path, or '<array i>' for the i-th in-memory image; classes: the K output
    classes; image_size: (H, W) of the decoded image, before any resizing.
  probs: {class: probability} (the model's own, float32 values, predict's CSV columns).
  calibrated: {class: recalibrated probability} with the recalibration stored with the
    checkpoint (predict's <class>_calibrated), else None.
  decisions: {class: p >= threshold, None where the class has none} with stored operating
    points (predict's <class>_decision; `rule` names the rule that chose them), else None.
  boxes: {class: [{'x', 'y', 'w', 'h', 'peak', 'mean'}]} for every class with
    p >= threshold (predict's boxes.json), in the image's pixels (x the column).
  saliency: float32 (N, N, K) maps over the whole image; `saliency_map(cls)` is one of them
    in image coordinates, float32 (H, W) (made on demand: 14 full-size maps of a DICOM take
    hundreds of MB).

  Example: `p = lsemil.load("exported/").predict("chest.png"); p.probs["Mass"]`.
  """

  source: str
  classes: tuple[str, ...]
  image_size: tuple[int, int]
  probs: dict[str, float]
  calibrated: dict[str, float] | None
  decisions: dict[str, bool | None] | None
  rule: str | None
  boxes: dict[str, list[dict[str, float]]]
  saliency: np.ndarray

  def saliency_map(self, cls: str) -> np.ndarray:
    """Class `cls`'s map as float32 (H, W) over the original image (`readout.image_map`)."""
    return readout.image_map(self.saliency[..., self.classes.index(cls)], self.image_size)

  def top(self, n: int = 3) -> list[tuple[str, float]]:
    """The `n` most probable classes, [(class, probability)], highest first."""
    return sorted(self.probs.items(), key=lambda kv: -kv[1])[:n]


class TrainedModel:
  """A loaded model: `predict` images, read `classes`, `input_size`, `config`, `step`."""

  def __init__(self, loaded: engine.LoadedModel):
    self.loaded = loaded
    self._predictor: engine.Predictor | None = None
    self._ops: tuple | None = None  # (stored operating points or None,) once read
    self._cal: tuple | None = None

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
    """The model's `engine.Predictor` with the run's saliency source (as `lsemil predict`),
    built on first use, on all local devices."""
    if self._predictor is None:
      source, level = registry.saliency_settings(self.config)
      self._predictor = engine.Predictor(
        self.loaded.model, self.loaded.variables, saliency_source=source, gradcam_level=level
      )
    return self._predictor

  @property
  def operating_points(self) -> dict | None:
    """The stored per-class thresholds {'rule', 'fit_split', 'classes', 'thresholds'}
    (`records.model_thresholds`: an export's thresholds.json, a workdir's valid evaluation
    of the step), else None."""
    if self._ops is None:
      self._ops = (records.model_thresholds(self.loaded),)
    return self._ops[0]

  @property
  def calibration(self) -> dict | None:
    """The stored recalibration (`records.model_calibration`), else None."""
    if self._cal is None:
      self._cal = (records.model_calibration(self.loaded),)
    return self._cal[0]

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

  def forward(
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


  def predict(
    self, images, *, threshold: float = THRESHOLD, box_tau: float = BOX_TAU, batch_size: int = 16
  ) -> Prediction | list[Prediction]:
    """Findings of one image or a list: a `Prediction` each (a list for a list).

    An image is a file path (str or Path: PNG, JPEG, DICOM, read as `lsemil predict` reads
    it, ImageError naming an unreadable file), a numpy array or a PIL image
    (`readout.gray_of_array`: grey, RGB(A), uint8 / uint16 / float in [0, 1]). `threshold`
    and `box_tau`: predict's --threshold (which classes get boxes) and --box-tau. Batched as
    predict batches files (runs of `batch_size`), so the numbers equal predict's exactly.

      >>> model.predict(["a.png", "b.dcm"])[1].decisions["Effusion"]
    """
    single = isinstance(images, str | os.PathLike | np.ndarray) or hasattr(images, "convert")
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[2] not in (1, 3, 4):
      single = False  # an (n, H, W) stack of grey images
    items = [images] if single else list(images)
    got = [self._read(x, i) for i, x in enumerate(items)]
    s = self.input_size
    x = np.stack([g[1] for g in got]) if got else np.zeros((0, s, s, 1), np.uint8)
    results = self.findings(
      x, [g[2] for g in got], [g[0] for g in got], threshold=threshold, box_tau=box_tau,
      batch_size=batch_size,
    )  # fmt: skip
    return results[0] if single else results

  def findings(
    self,
    inputs: np.ndarray,
    image_sizes: Sequence[tuple[int, int]],
    sources: Sequence[str],
    *,
    threshold: float = THRESHOLD,
    box_tau: float = BOX_TAU,
    batch_size: int = 16,
  ) -> list[Prediction]:
    """A `Prediction` per uint8 (n, S, S, 1) model input (`predict` after reading; `lsemil
    serve` reads its uploads itself), `image_sizes` the (H, W) of each decoded image."""
    if not len(inputs):
      return []
    out = self.forward(inputs, batch_size=batch_size)
    probs = np.asarray(out["probs"], np.float64)
    ops, cal, classes = self.operating_points, self.calibration, self.classes
    decided = readout.decisions(ops["thresholds"] if ops else None, probs)
    recal = calibration.apply(cal, probs) if cal is not None else None
    rule = f"{ops.get('rule')} ({ops.get('fit_split', 'valid')} split)" if ops else None
    return [
      Prediction(
        source=str(src), classes=classes, image_size=(int(shape[0]), int(shape[1])),
        probs=dict(zip(classes, probs[j].tolist(), strict=True)),
        calibrated=None if recal is None else dict(zip(classes, recal[j].tolist(), strict=True)),
        decisions=None if decided is None else dict(zip(classes, decided[j], strict=True)),
        rule=rule,
        boxes=readout.boxes(out["saliency"][j], probs[j], classes, threshold, box_tau, shape),
        saliency=np.asarray(out["saliency"][j], np.float32),
      )  # fmt: skip
      for j, (src, shape) in enumerate(zip(sources, image_sizes, strict=True))
    ]

  def _read(self, image, i: int) -> tuple[str, np.ndarray, tuple[int, int]]:
    """(source, model input, (H, W)) of one image; ImageError naming it."""
    if isinstance(image, str | os.PathLike):
      failures = []
      got = readout.read_one(os.fspath(image), self.input_size, "first", False, failures)
      if got is None:
        raise ImageError(failures[0][1])
      return str(image), got[0], got[2]
    name = f"<array {i}>"
    gray = readout.gray_of_array(image, name)
    return name, engine.model_input(gray, self.input_size), (gray.shape[0], gray.shape[1])


def load(path: str | os.PathLike, which: str = "best") -> TrainedModel:
  """A `TrainedModel` of a training workdir ('best' or 'latest' checkpoint), its
  checkpoints/ folder, a step folder, or a folder of `lsemil export`; local or gs://.
  Raises CheckpointError naming the path (non-finite or changed weights included)."""
  return TrainedModel(engine.load(path, which))
