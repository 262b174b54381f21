"""Image decoding and resizing for NIH ChestX-ray14 (Sec 4.2: 1024 -> 512 inputs).

Every image, whatever its PNG mode, becomes an 8-bit grayscale (H, W) array:

- 8-bit L is kept as is; LA / RGBA drop alpha; RGB (and palette) use the ITU-R 601
  luma weights (cv2's BGR2GRAY, PIL's `convert('L')` within 1 grey level).
- 16-bit images (I;16, 16-bit RGB) are scaled to 8 bits with `round(v * 255 / 65535)`,
  so the full 16-bit range maps onto 0..255 (never clipped at 255).

The paper downsamples with `skimage.transform.resize` (anti-aliased: a Gaussian
prefilter with sigma = (factor - 1) / 2, then bilinear sampling at pixel centres).
`resize_gray` reproduces that with cv2 (`sepFilter2D` of the same truncated
Gaussian, then INTER_LINEAR, whose sample grid is skimage's) about 20x faster;
measured max |difference| after rounding to uint8 is 0.5/255 (rounding only).
Plain INTER_AREA is faster still but differs by up to ~8/255 on NIH images.

Files that are refused (`ImageError`, naming the file; `lsemil prepare --on-bad skip` skips
and lists them, `--on-bad error` stops at the first):

- anything but a regular file (a FIFO, a device such as /dev/zero, a folder, a socket), from
  its `stat` before it is opened: a FIFO would block forever, a device never ends;
- a file larger than `MAX_FILE_BYTES` (160 MB), from its size before it is read: a
  `MAX_PIXELS` image of 16-bit grey stored uncompressed (80 MB, a raw DICOM or a stored PNG)
  twice over, room for headers, metadata and colour; a 6 GB (sparse) file is never read;
- an empty (0-byte), unreadable (e.g. a symlink loop), truncated or corrupt file;
- more than `MAX_PIXELS` (40 megapixels, e.g. 6324 x 6324; NIH images are 1 Mpx and the
  largest radiographs about 18 Mpx), read from the PNG header (or, for other formats, PIL's
  header parse) BEFORE anything is decoded: a 405 KB PNG of 20000 x 20000 would cost 2 GB;
- a side under `MIN_SIDE` (32 px): no radiograph, and nothing to resize up to 512 from;
- a `.png` name whose content is not a PNG (e.g. a JPEG): refused rather than decoded,
  since a lossy file under a lossless name is a mix-up in the dataset.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import cv2
import numpy as np

from lsemil.core import fileio
from lsemil.core.errors import ImageError

# cv2's own thread pool fights grain's read threads on small machines.
cv2.setNumThreads(1)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PIXELS = 40_000_000  # refused above this many pixels, before decoding
MIN_SIDE = 32  # refused when the width or height is smaller
MAX_FILE_BYTES = 2 * 2 * MAX_PIXELS  # refused above this size, before reading (docstring)
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"),
                (stat.S_ISSOCK, "a socket"))
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
          b"MM\x00*": "TIFF", b"RIFF": "RIFF/WebP", b"DICM": "DICOM"}


def _check_png_complete(data: bytes, name: str) -> None:
  """Raises ImageError unless `data` is a PNG whose chunks run to an IEND chunk.

  libpng (through cv2) happily decodes a truncated file into a partly black image;
  walking the chunk lengths catches that cheaply without a second decode.
  """
  if not data.startswith(PNG_SIGNATURE):
    raise ImageError(f"{name}: not a PNG file (bad signature)")
  pos, n = 8, len(data)
  while pos + 8 <= n:
    (length,) = struct.unpack(">I", data[pos : pos + 4])
    kind = data[pos + 4 : pos + 8]
    end = pos + 12 + length
    if end > n:
      raise ImageError(f"{name}: truncated PNG ({kind.decode('latin1')} chunk cut short)")
    if kind == b"IEND":
      return
    pos = end
  raise ImageError(f"{name}: truncated PNG (no IEND chunk)")


def is_complete_png(data: bytes) -> bool:
  """A PNG whose chunks run to IEND (not truncated), checked without decoding."""
  try:
    _check_png_complete(data, "")
  except ImageError:
    return False
  return True


def png_header(data: bytes, name: str = "<bytes>") -> tuple[int, int, int, int]:
  """(width, height, bit_depth, color_type) from a PNG's IHDR chunk."""
  if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 26:
    raise ImageError(f"{name}: not a PNG file")
  width, height, depth, color = struct.unpack(">IIBB", data[16:26])
  return width, height, depth, color


def check_size(width: int, height: int, name: str) -> None:
  """Raises ImageError for more than MAX_PIXELS pixels or a side under MIN_SIDE."""
  if width * height > MAX_PIXELS:
    raise ImageError(
      f"{name}: {width}x{height} pixels, above the limit of {MAX_PIXELS:,} "
      "(lsemil.data.imageio.MAX_PIXELS); not decoded"
    )
  if min(width, height) < MIN_SIDE:
    raise ImageError(f"{name}: {width}x{height} pixels, smaller than {MIN_SIDE} px a side")


def check_file(path: str | os.PathLike) -> int:
  """The size of `path`, a regular file of at most MAX_FILE_BYTES; else ImageError naming it.
  Only `stat`ed, never opened (opening a FIFO blocks until a writer comes)."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise ImageError(f"{path}: file not found") from None
  except OSError as e:  # a symlink loop, a name too long, no permission
    raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
  if not stat.S_ISREG(st.st_mode):
    what = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "unknown type")
    raise ImageError(f"{path}: not a regular file ({what}); not read")
  if st.st_size > MAX_FILE_BYTES:
    raise ImageError(
      f"{path}: {st.st_size:,} bytes, above the limit of {MAX_FILE_BYTES:,} bytes "
      "(lsemil.data.imageio.MAX_FILE_BYTES); not read"
    )
  return st.st_size


def _kind(data: bytes) -> str:
  for magic, kind in _MAGIC.items():
    if data.startswith(magic) or (kind == "DICOM" and data[128:132] == magic):
      return kind
  return "unknown"


def to_gray8(img: np.ndarray, name: str = "<array>") -> np.ndarray:
  """Any cv2-decoded array (gray / BGR / BGRA, uint8 / uint16) -> uint8 (H, W)."""
  if img.ndim == 3:
    if img.shape[2] == 1:
      img = img[:, :, 0]
    elif img.shape[2] in (3, 4):
      code = cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
      if img.dtype == np.uint16:
        # cvtColor on uint16 rounds to uint16; do it in float to keep the 16-bit detail.
        img = cv2.cvtColor(img.astype(np.float32), code)
        img = np.clip(np.rint(img), 0, 65535).astype(np.uint16)
      else:
        img = cv2.cvtColor(img, code)
    else:
      raise ImageError(f"{name}: unsupported channel count {img.shape[2]}")
  elif img.ndim != 2:
    raise ImageError(f"{name}: unsupported image shape {img.shape}")
  if img.dtype == np.uint8:
    return np.ascontiguousarray(img)
  if img.dtype == np.uint16:
    scaled = (img.astype(np.uint32) * 255 + 32767) // 65535
    return scaled.astype(np.uint8)
  raise ImageError(f"{name}: unsupported pixel type {img.dtype}")


def decode_png(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """PNG bytes -> uint8 (H, W) grayscale; raises ImageError naming `name` if bad (too large
  or too small is refused from the header, before decoding)."""
  _check_png_complete(data, name)
  width, height, _, _ = png_header(data, name)
  check_size(width, height, name)
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if img is None:
    raise ImageError(f"{name}: corrupt PNG (decoder failed)")
  return to_gray8(img, name)


def read_gray(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as uint8 (H, W) grayscale; errors name the file.

  PNGs are checked for truncation; other formats cv2 reads (JPEG, TIFF, ...) are
  accepted as a convenience for `predict`, unless the file is named .png. Every refusal of
  the module docstring applies, size limits before decoding.
  """
  path = Path(path)
  check_file(path)
  try:
    with open(path, "rb") as f:
      head = f.read(140)  # the PNG IHDR; byte 132 past a DICOM preamble, for the message
      if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 26:
        check_size(*png_header(head, str(path))[:2], str(path))  # before the rest is read
      elif head and not head.startswith(PNG_SIGNATURE) and path.suffix.lower() != ".png":
        _check_header_size(f, str(path))
        f.seek(len(head))
      data = head + f.read(MAX_FILE_BYTES + 1 - len(head))
  except OSError as e:  # a name too long, no permission, an I/O error
    raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
  if not data:
    raise ImageError(f"{path}: empty file (0 bytes)")
  if len(data) > MAX_FILE_BYTES:  # grew after its stat
    raise ImageError(f"{path}: above the limit of {MAX_FILE_BYTES:,} bytes; not read")
  if data.startswith(PNG_SIGNATURE):
    return decode_png(data, str(path))
  if path.suffix.lower() == ".png":
    raise ImageError(f"{path}: named .png but not a PNG file (content: {_kind(data)})")
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if img is None:
    raise ImageError(f"{path}: not a readable image")
  return to_gray8(img, str(path))


def _check_header_size(source, name: str) -> None:
  """check_size from a non-PNG file's header (PIL parses headers lazily, decoding nothing);
  `source`: the file's bytes or its open binary file (only the header is read)."""
  import io
  import warnings

  from PIL import Image

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      src = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
      with Image.open(src) as im:
        width, height = im.size
  except Image.DecompressionBombError:
    raise ImageError(f"{name}: above PIL's decompression-bomb limit; not decoded") from None
  except Exception:  # a format PIL does not know: cv2 may still read it
    return
  check_size(width, height, name)


def resize_gray(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """uint8 (H, W) -> uint8 (size, size) as `skimage.transform.resize` (Sec 4.2).

  Downscaling prefilters each axis with skimage's Gaussian (sigma = (factor-1)/2,
  truncated at 4 sigma, mirror borders) before bilinear sampling at pixel centres;
  upscaling is plain bilinear, as in skimage.
  """
  out_h, out_w = (size, size) if isinstance(size, int) else size
  h, w = img.shape[:2]
  if (h, w) == (out_h, out_w):
    return img
  sig_y, sig_x = max(0.0, (h / out_h - 1) / 2), max(0.0, (w / out_w - 1) / 2)
  if sig_x > 0 or sig_y > 0:
    kx, ky = _gaussian_kernel(sig_x), _gaussian_kernel(sig_y)
    src = cv2.sepFilter2D(img, cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REFLECT_101)
  else:
    src = img.astype(np.float32)
  out = cv2.resize(src, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gaussian_kernel(sigma: float) -> np.ndarray:
  if sigma <= 0:
    return np.ones((1, 1), np.float32)
  radius = int(4.0 * sigma + 0.5)  # scipy.ndimage's truncate=4.0
  return cv2.getGaussianKernel(2 * radius + 1, sigma, cv2.CV_32F)


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """One image file -> uint8 (size, size) grayscale, resized as in preparation."""
  return resize_gray(read_gray(path), size)


def encode_png(img: np.ndarray, compression: int = 1) -> bytes:
  """uint8 (H, W) -> PNG bytes (fast zlib level: decode speed is unaffected)."""
  ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, compression])
  if not ok:
    raise ImageError("PNG encoding failed")
  return buf.tobytes()


def write_png_atomic(path: Path, data: bytes) -> None:
  """Writes via a temp name + rename (`fileio.write_bytes`), so a crash never leaves a
  trusted partial file."""
  fileio.write_bytes(path, data)
