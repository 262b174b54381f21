"""From image files to model inputs, and from the forward's outputs to findings: the one
implementation `lsemil predict`, `lsemil serve` and `lsemil.load(...).predict` share.

- `read_image`: a PNG, JPEG (anything OpenCV reads) or DICOM file -> uint8 (H, W) grey, with
  every guard of `lsemil.data.imageio.check_file` first; `read_one` adds the model input
  (`engine.model_input`) and reports a file that cannot be read instead of stopping.
- `decisions`: p >= the stored per-class threshold (`records.model_thresholds`), on the
  model's own probability (the thresholds were chosen on it, before any recalibration).
- `boxes`: per class with p >= threshold, the IoBB protocol's boxes
  (`lsemil.metrics.localization.boxes_from_map`: the map binarized at `box_tau`, 8-connected
  components boxed) in the file's own pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from lsemil.core import log
from lsemil.core.errors import ImageError, UserError
from lsemil.data import dicom, imageio, pipeline
from lsemil.inference import engine
from lsemil.metrics import localization


def read_image(path, multiframe: str = "first") -> np.ndarray:
  """Any supported file -> uint8 (H, W) grey; raises ImageError naming the file.
  `multiframe`: a multi-frame DICOM's 'first' frame (with a warning) or 'refuse'."""
  imageio.check_file(path)  # a regular file of a sane size, before anything opens it
  if dicom.is_dicom(path):
    return dicom.read_dicom(path, multiframe)
  return imageio.read_gray(path)


def read_one(path, input_size: int, multiframe: str, want_prepared: bool, failures: list):
  """(model input, prepared image or None, (H, W)) of one file; None for a file that cannot
  be read, which is appended to `failures` as (path, message) and logged."""
  try:
    gray = read_image(path, multiframe)
    prepared = pipeline.prepared_image(gray) if want_prepared else None
    return engine.model_input(gray, input_size), prepared, (int(gray.shape[0]), int(gray.shape[1]))
  except (UserError, OSError, ValueError, cv2.error) as e:
    msg = str(e) if str(path) in str(e) else f"{path}: {e}"
    failures.append((str(path), msg))
    log.warning(msg)
    return None


def decisions(thresholds, probs: np.ndarray) -> list[list[bool | None]] | None:
  """Per row and class: p >= threshold, None where the class has no threshold."""
  if thresholds is None:
    return None
  return [
    [None if t is None else bool(p >= t) for p, t in zip(row, thresholds, strict=True)]
    for row in probs
  ]


def boxes(
  saliency: np.ndarray,
  probs: Sequence[float],
  classes: Sequence[str],
  threshold: float,
  box_tau: float,
  shape: tuple[int, int],
) -> dict[str, list[dict[str, float]]]:
  """{class: [{x, y, w, h, peak, mean}]} of one image's (N, N, K) maps, for every class with
  p >= threshold (NaN never passes), in the (H, W) = `shape` pixels of its file."""
  return {
    cls: localization.boxes_from_map(saliency[..., k], box_tau, shape)
    for k, cls in enumerate(classes)
    if probs[k] >= threshold
  }


def image_map(saliency_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """One class's (N, N) map over the whole image -> float32 (H, W) in the file's pixels:
  nearest neighbour at pixel centres, the rule `boxes_from_map` resizes with
  (`lsemil.metrics.overlap.resize_saliency`), so a box lies on the map's region."""
  s = np.asarray(saliency_map, np.float32)
  h, w = (int(v) for v in shape)
  rows = np.minimum(((np.arange(h) + 0.5) * s.shape[0] / h).astype(np.int64), s.shape[0] - 1)
  cols = np.minimum(((np.arange(w) + 0.5) * s.shape[1] / w).astype(np.int64), s.shape[1] - 1)
  return s[np.ix_(rows, cols)]


def gray_of_array(image, name: str = "<array>") -> np.ndarray:
  """A decoded image -> uint8 (H, W) grey, converted as a file of the same pixels is:
  (H, W) or (H, W, 1) grey, (H, W, 3) RGB or (H, W, 4) RGBA (the channel order of PIL,
  imageio and matplotlib), uint8 or uint16 (`imageio.to_gray8`, the decoder's rule), or float
  in [0, 1] (x 255, rounded). A PIL image is read as its array (modes other than L, RGB,
  RGBA and I;16 through RGB). ImageError naming `name` for anything else."""
  if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
    kept = image.mode in ("L", "RGB", "RGBA", "I;16")
    image = np.asarray(image if kept else image.convert("RGB"))
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[..., 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
    raise ImageError(f"{name}: shape {a.shape} is not (H, W), (H, W, 3) or (H, W, 4)")
  if a.dtype.kind == "f":
    if not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
      raise ImageError(f"{name}: a float image must hold values in [0, 1]")
    a = np.rint(a * 255).astype(np.uint8)
  if a.dtype not in (np.uint8, np.uint16):
    raise ImageError(f"{name}: dtype {a.dtype}; give uint8, uint16 or float in [0, 1]")
  imageio.check_size(a.shape[1], a.shape[0], name)  # predict's pixel limits
  if a.ndim == 3:  # RGB(A) -> the BGR(A) order cv2 decodes files to
    a = np.ascontiguousarray(a[..., [2, 1, 0, 3][: a.shape[2]]])
  return imageio.to_gray8(a, name)
