"""DICOM input for `lsemil predict`: any DICOM chest X-ray -> 8-bit grey, bright = dense.

`read_dicom`: the Modality LUT / RescaleSlope and RescaleIntercept are applied, then the VOI
LUT (a VOI LUT Sequence, else the first WindowCenter / WindowWidth pair, with the linear
function of DICOM PS3.3 C.11.2.1.2), else a min-max stretch; MONOCHROME1 images (bright = low
values) are inverted so that bone is bright as in the NIH PNGs. Needs the `dicom` extra
(pydicom).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lsemil.core.errors import ImageError
from lsemil.data import imageio

DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: str | Path) -> bool:
  """A .dcm / .dicom name, or the 'DICM' magic at byte 128 of the file."""
  path = Path(path)
  if path.suffix.lower() in DICOM_SUFFIXES:
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return head[128:132] == b"DICM"


def _first(value) -> float:
  """First value of a DICOM (multi-)value as float."""
  if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
    return float(value)
  return float(value[0])


def window_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
  """DICOM PS3.3 C.11.2.1.2 'LINEAR' VOI windowing onto [0, 1]."""
  width = max(float(width), 1.0)
  y = (x - (center - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (x > center - 0.5) * 1.0
  return np.clip(y, 0.0, 1.0)


def read_dicom(path: str | Path) -> np.ndarray:
  """A DICOM file -> uint8 (H, W) grey, bright = dense (see the module docstring)."""
  path = Path(path)
  try:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
  except ImportError:
    raise ImageError(
      f"{path}: reading DICOM needs pydicom (pip install 'lsemil[dicom]')"
    ) from None
  try:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
  except Exception as e:  # pydicom raises many kinds for bad files
    raise ImageError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from None
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  samples = int(ds.get("SamplesPerPixel", 1))
  if samples == 1 and arr.ndim == 3:  # multi-frame: the first frame
    arr = arr[0]
  if samples > 1:
    if arr.ndim == 4:
      arr = arr[0]
    return imageio.to_gray8(np.ascontiguousarray(arr[..., ::-1]), str(path))  # RGB -> BGR
  if arr.ndim != 2:
    raise ImageError(f"{path}: unsupported DICOM pixel array shape {arr.shape}")
  x = np.asarray(apply_modality_lut(arr, ds), np.float64)
  if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
    y = np.asarray(apply_voi_lut(x, ds, index=0, prefer_lut=True), np.float64)
    y = np.clip(y / (2.0**bits - 1.0), 0.0, 1.0)
  elif "WindowCenter" in ds and "WindowWidth" in ds:
    y = window_linear(x, _first(ds.WindowCenter), _first(ds.WindowWidth))
  else:
    lo, hi = float(x.min()), float(x.max())
    y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
  if photometric == "MONOCHROME1":
    y = 1.0 - y
  return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)
