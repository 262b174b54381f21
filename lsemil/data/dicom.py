"""DICOM input for `lsemil predict`: any DICOM chest X-ray -> 8-bit grey, bright = dense.

`read_dicom`: the header is read first and the size guards of `imageio.check_size` apply to
Rows x Columns before any pixel is decoded. A multi-frame file gives its first frame (with a
warning naming the file and its frame count) or is refused (`multiframe="refuse"`). Then
the Modality LUT / RescaleSlope and RescaleIntercept are applied (PS3.3 C.11.1), then the
VOI LUT (a VOI LUT Sequence, PS3.3 C.11.2.1.1, else the first WindowCenter / WindowWidth
pair, with the linear function of PS3.3 C.11.2.1.2), else a min-max stretch; MONOCHROME1
images (bright = low values) are inverted so that bone is bright as in the NIH PNGs.
PALETTE COLOR (PS3.3 C.7.6.3.1.5) goes through its palette, then the RGB luma rule of
`imageio.to_gray8`. A zero-length window or rescale element counts as absent (empty rescale =
identity); a malformed VOI LUT is an ImageError naming the file. Needs the `dicom` extra
(pydicom).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lsemil.core import log
from lsemil.core.errors import ImageError
from lsemil.data import imageio

DICOM_SUFFIXES = (".dcm", ".dicom")
MULTIFRAME = ("first", "refuse")  # what read_dicom does with a multi-frame file


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


def _value(ds, keyword) -> float | None:
  """First value of a (multi-)valued element as float; None when absent or zero-length."""
  value = ds.get(keyword)
  if value is not None and not isinstance(value, str | bytes) and hasattr(value, "__len__"):
    value = value[0] if len(value) else None
  if value is None or (isinstance(value, str | bytes) and not value.strip()):
    return None
  return float(value)


def window_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
  """DICOM PS3.3 C.11.2.1.2 'LINEAR' VOI windowing onto [0, 1]."""
  width = max(float(width), 1.0)
  y = (x - (center - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (x > center - 0.5) * 1.0
  return np.clip(y, 0.0, 1.0)


def voi_lut(x: np.ndarray, item, little_endian: bool = True, signed: bool = False) -> np.ndarray:
  """A VOI LUT Sequence item applied to `x`, onto [0, 1] (PS3.3 C.11.2.1.1): LUT Descriptor =
  (entries, 0 = 65536; first mapped value; bits an entry, 8..16); values below the first
  mapped one take the first entry, above the last mapped one the last; output / (2^bits - 1).
  Raises ValueError for a malformed item."""
  desc = item.get("LUTDescriptor")
  if desc is None or isinstance(desc, str | bytes) or len(desc) != 3:
    raise ValueError("VOI LUT item without a valid LUT Descriptor (0028,3002)")
  n, first, bits = (int(v) for v in desc)
  n = n or 65536
  if signed and first >= 32768:  # US or SS by Pixel Representation
    first -= 65536
  if not 8 <= bits <= 16:
    raise ValueError(f"VOI LUT Descriptor: {bits} bits an entry, not 8..16")
  data = item.get("LUTData")
  if isinstance(data, bytes):  # OW: 16-bit words
    lut = np.frombuffer(data[: 2 * (len(data) // 2)], "<u2" if little_endian else ">u2")
  else:
    lut = np.asarray([] if data is None else data, np.float64).reshape(-1)
  if lut.size < n:
    raise ValueError(f"VOI LUT Data (0028,3006): {lut.size} entries, the descriptor says {n}")
  idx = np.clip(np.rint(x) - first, 0, n - 1).astype(np.int64)
  return np.clip(lut[:n].astype(np.float64)[idx] / (2.0**bits - 1.0), 0.0, 1.0)


def _modality(arr: np.ndarray, ds) -> np.ndarray:
  """PS3.3 C.11.1: the Modality LUT Sequence, else Rescale Slope / Intercept (a zero-length
  one is absent: slope 1, intercept 0)."""
  from pydicom.pixels import apply_modality_lut

  if ds.get("ModalityLUTSequence"):
    return np.asarray(apply_modality_lut(arr, ds), np.float64)
  slope, intercept = _value(ds, "RescaleSlope"), _value(ds, "RescaleIntercept")
  x = arr.astype(np.float64)
  return x * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)


def _header(path: Path, multiframe: str):
  """The header (no pixel data), its size and frames checked; returns the frame count."""
  import pydicom

  try:
    head = pydicom.dcmread(path, stop_before_pixels=True)
    rows, cols = int(head.Rows), int(head.Columns)
    frames = int(_value(head, "NumberOfFrames") or 1)
  except Exception as e:  # pydicom raises many kinds for bad files
    raise ImageError(f"{path}: unreadable DICOM header ({type(e).__name__}: {e})") from None
  imageio.check_size(cols, rows, str(path))
  if frames > 1:
    if multiframe == "refuse":
      raise ImageError(f"{path}: multi-frame DICOM ({frames} frames), refused (--multiframe)")
    log.warning(f"{path}: multi-frame DICOM ({frames} frames); only the first frame is used")
  return frames


def read_dicom(path: str | Path, multiframe: str = "first") -> np.ndarray:
  """A DICOM file -> uint8 (H, W) grey, bright = dense (see the module docstring).

  multiframe: 'first' (frame 0, with a warning) or 'refuse' (an ImageError)."""
  path = Path(path)
  if multiframe not in MULTIFRAME:
    raise ValueError(f"multiframe must be one of {MULTIFRAME}, got {multiframe!r}")
  try:
    import pydicom
    from pydicom.pixels import apply_color_lut, pixel_array
  except ImportError:
    raise ImageError(
      f"{path}: reading DICOM needs pydicom (pip install 'lsemil[dicom]')"
    ) from None
  frames = _header(path, multiframe)
  try:
    ds = pydicom.dcmread(path)
    arr = pixel_array(ds, index=0 if frames > 1 else None)
  except Exception as e:  # pydicom raises many kinds for bad files
    raise ImageError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from None
  try:
    return _to_gray8(arr, ds, path, apply_color_lut)
  except ImageError:
    raise
  except Exception as e:  # malformed LUTs, palettes, values: the file's fault, not lsemil's
    raise ImageError(f"{path}: unsupported DICOM ({type(e).__name__}: {e})") from None


def _to_gray8(arr: np.ndarray, ds, path: Path, apply_color_lut) -> np.ndarray:
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  samples = int(ds.get("SamplesPerPixel", 1))
  if photometric == "PALETTE COLOR" and samples == 1:
    rgb = np.asarray(apply_color_lut(arr, ds))
    return imageio.to_gray8(np.ascontiguousarray(rgb[..., ::-1]), str(path))  # RGB -> BGR
  if samples > 1:
    return imageio.to_gray8(np.ascontiguousarray(arr[..., ::-1]), str(path))  # RGB -> BGR
  if arr.ndim != 2:
    raise ImageError(f"{path}: unsupported DICOM pixel array shape {arr.shape}")
  x = _modality(arr, ds)
  center, width = _value(ds, "WindowCenter"), _value(ds, "WindowWidth")
  if ds.get("VOILUTSequence"):
    little = getattr(ds, "original_encoding", (None, True))[1] is not False
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    try:
      y = voi_lut(x, ds.VOILUTSequence[0], little, signed)
    except ValueError as e:
      raise ImageError(f"{path}: {e}") from None
  elif center is not None and width is not None:
    y = window_linear(x, center, width)
  else:
    lo, hi = float(x.min()), float(x.max())
    y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
  if photometric == "MONOCHROME1":
    y = 1.0 - y
  return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)
