"""lsemil.data.dicom: empty elements, VOI LUTs, palettes, size guards and multi-frame files
(DICOM PS3.3 C.7.6.3, C.11.1, C.11.2); the files are written with pydicom (`write_dicom`)."""

from __future__ import annotations

import numpy as np
import pytest

from lsemil.core.errors import ImageError
from lsemil.data import dicom, imageio

pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")


def _ramp(h=48, w=40, top=4095) -> np.ndarray:
  return (np.arange(h * w).reshape(h, w) * top // (h * w - 1)).astype(np.uint16)


def _minmax(raw) -> np.ndarray:
  x = raw.astype(np.float64)
  return np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)


def test_empty_window_and_rescale_are_absent(write_dicom, tmp_path):
  raw = _ramp()
  for name, elements in {
    "window": {"WindowCenter": None, "WindowWidth": None},
    "center": {"WindowCenter": None, "WindowWidth": 100},
    "rescale": {"RescaleSlope": None, "RescaleIntercept": None},
    "slope": {"RescaleSlope": None, "RescaleIntercept": -10},
  }.items():
    path = write_dicom(tmp_path / f"{name}.dcm", raw, **elements)
    np.testing.assert_array_equal(dicom.read_dicom(path), _minmax(raw), err_msg=name)


def test_voi_lut_item_without_descriptor_names_the_file(write_dicom, tmp_path):
  from pydicom.dataset import Dataset

  item = Dataset()
  item.add_new(0x00283006, "US", list(range(256)))  # LUTData, no LUTDescriptor
  path = write_dicom(tmp_path / "nodesc.dcm", _ramp(), VOILUTSequence=[item])
  with pytest.raises(ImageError, match=r"nodesc\.dcm: .*LUT Descriptor"):
    dicom.read_dicom(path)


def _voi_item(descriptor, lut):
  from pydicom.dataset import Dataset

  item = Dataset()
  item.add_new(0x00283002, "US", list(descriptor))  # LUTDescriptor
  item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUTData
  return item


def test_8bit_voi_lut_on_a_12bit_image(write_dicom, tmp_path):
  raw = _ramp()
  lut = np.arange(4096) // 16  # 0..255, PS3.3 C.11.2.1.1: 8 bits an entry
  path = write_dicom(tmp_path / "voi8.dcm", raw, VOILUTSequence=[_voi_item([4096, 0, 8], lut)])
  img = dicom.read_dicom(path)
  np.testing.assert_array_equal(img, (raw // 16).astype(np.uint8))
  assert img.max() == 255
  # First mapped value 1000, 1024 entries: below -> the first entry, above -> the last.
  lut = np.arange(1024) // 4
  item = _voi_item([1024, 1000, 8], lut)
  path = write_dicom(tmp_path / "voi8b.dcm", raw, VOILUTSequence=[item])
  expected = lut[np.clip(raw.astype(int) - 1000, 0, 1023)].astype(np.uint8)
  np.testing.assert_array_equal(dicom.read_dicom(path), expected)
  # 16 bits an entry: output / 65535.
  lut = np.arange(4096) * 16
  item = _voi_item([4096, 0, 16], lut)
  path = write_dicom(tmp_path / "voi16.dcm", raw, VOILUTSequence=[item])
  expected = np.rint(raw * 16 / 65535 * 255).astype(np.uint8)
  np.testing.assert_array_equal(dicom.read_dicom(path), expected)


def test_palette_color_is_the_palettes_luma(write_dicom, tmp_path):
  idx = np.zeros((40, 50), np.uint8)
  for k in range(5):
    idx[:, 10 * k : 10 * (k + 1)] = k
  red, green, blue = (np.zeros(256, np.uint16) for _ in range(3))
  # index 0 red, 1 green, 2 blue, 3 white, 4 black
  red[[0, 3]], green[[1, 3]], blue[[2, 3]] = 65535, 65535, 65535
  desc = [256, 0, 16]
  path = write_dicom(
    tmp_path / "palette.dcm", idx, photometric="PALETTE COLOR",
    RedPaletteColorLookupTableDescriptor=desc, GreenPaletteColorLookupTableDescriptor=desc,
    BluePaletteColorLookupTableDescriptor=desc,
    RedPaletteColorLookupTableData=red.tobytes(), GreenPaletteColorLookupTableData=green.tobytes(),
    BluePaletteColorLookupTableData=blue.tobytes(),
  )  # fmt: skip
  img = dicom.read_dicom(path)
  # Luma 0.299 R + 0.587 G + 0.114 B (imageio.to_gray8's rule) of 16-bit colours, to 8 bits.
  np.testing.assert_array_equal(img[0, ::10], [76, 150, 29, 255, 0])
  assert img.shape == idx.shape
  bare = write_dicom(tmp_path / "bare.dcm", idx, photometric="PALETTE COLOR")  # no palette
  with pytest.raises(ImageError, match=r"bare\.dcm: unsupported DICOM"):
    dicom.read_dicom(bare)


def test_size_guards_from_the_header_before_decoding(write_dicom, tmp_path, monkeypatch):
  tiny = write_dicom(tmp_path / "tiny.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4))
  with pytest.raises(ImageError, match=r"tiny\.dcm: 4x4 pixels, smaller than"):
    dicom.read_dicom(tiny)
  # A header claiming 7000 x 7000 (49 Mpx): refused without touching the pixel data.
  huge = write_dicom(tmp_path / "huge.dcm", _ramp(), shape=(7000, 7000))
  import pydicom

  def no_decode(*a, **k):
    raise AssertionError("decoded")

  monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decode))
  monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decode)
  with pytest.raises(ImageError, match=r"huge\.dcm: 7000x7000 pixels, above the limit"):
    dicom.read_dicom(huge)
  assert imageio.MAX_PIXELS < 7000 * 7000


def test_multiframe_first_warns_refuse_refuses(write_dicom, tmp_path, capsys):
  frames = np.stack([_ramp(), _ramp()[::-1], _ramp()[:, ::-1]])
  path = write_dicom(tmp_path / "multi.dcm", frames)
  np.testing.assert_array_equal(dicom.read_dicom(path), _minmax(frames[0]))
  warning = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
  assert len(warning) == 1 and "multi.dcm" in warning[0] and "3 frames" in warning[0]
  with pytest.raises(ImageError, match=r"multi\.dcm: .*3 frames.*--multiframe"):
    dicom.read_dicom(path, multiframe="refuse")
  with pytest.raises(ValueError, match="multiframe"):
    dicom.read_dicom(path, multiframe="all")
