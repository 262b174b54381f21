"""The local web viewer of `lsemil serve`: drop chest X-rays on a page, see what the model says.

`Viewer` predicts one uploaded file the way `lsemil predict` and `lsemil.load(...).predict`
do, through `lsemil.inference.trained_model.TrainedModel`: the upload is written to a private
temporary folder (mode 0700, removed on `close`) under its own name's suffix and read by
`readout.read_one` (every size, pixel and type guard of `lsemil.data.imageio` and the DICOM
rules of `lsemil.data.dicom`, nothing copied), turned into the model input by
`engine.model_input` and run through the one `engine.Predictor` with the run's saliency source
(`registry.saliency_settings`), batched alone as `predict` batches one file
(`TrainedModel.findings`). So the probabilities are `lsemil predict`'s for the same file; the
decisions use the operating points stored with the checkpoint and the calibrated probabilities
the stored recalibration (`lsemil.inference.records`), as predict's columns. Each class's map
S (Sec 3.6) comes back with its boxes (`readout.boxes` at `BOX_TAU`, predict --boxes' default,
for every class, in the file's own pixels) and an overlay PNG coloured with
the scale of `lsemil.reporting.drawing` ('jet' over 0..1 at alpha 0.5, nearest upsampling).
The class names are `findings.of_config` of the run.

`make_server` serves the page (viewer-page/index.html, .js and .css beside this module, package
data: no CDN, no font, no request leaves the machine; a Content-Security-Policy of 'self' makes
the browser refuse any other origin) and these routes:

  GET  /                       the page
  GET  /static/NAME            one of the page's files (a fixed list, never a path)
  GET  /api/info               the model (checkpoint, step, classes, operating points)
  POST /api/predict            the raw file bytes as the body, its name percent-encoded in
                               the X-File-Name header -> 200 {result, view} or 4xx {error}
  GET  /browse/PATH            a file of the --browse folder (a `reproduce` output folder:
                               index.html and its figures), nothing outside it

A path of /browse is percent-decoded once, refused (403) with a '..' part, a backslash or a
NUL, joined to the folder and resolved (symlinks followed); the result must lie inside the
resolved folder (403) and be a regular file (404). Requests whose Host header names another
machine than the one bound are refused (403: a DNS-rebinding page cannot read the folder),
and an upload needs the custom header, which a cross-site form cannot send. A bad file gets
422 with the one-line message naming it; the server keeps serving.

Why the standard library's ThreadingHTTPServer and not FastAPI + uvicorn: the viewer has five
routes for one local user, uploads are raw request bodies (no multipart parser: Python 3.13
removed cgi, FastAPI would need python-multipart), and the one piece a framework would give
for free, serving a folder, still needs the containment rule above checked and tested here.
FastAPI, starlette, pydantic, uvicorn, anyio, h11 and python-multipart would be seven new
dependencies in every install for that. JAX runs one prediction at a time (a lock); the
threads keep the page's static files and the report responsive meanwhile.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import mimetypes
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import urllib.parse
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from lsemil.core import log
from lsemil.core.errors import ImageError, OutputError
from lsemil.data import imageio
from lsemil.inference import engine, readout, trained_model

BOX_TAU = 0.5  # the saliency threshold of the drawn boxes: predict --box-tau's default
OVERLAY_ALPHA = 0.5  # drawing.overlay_png's
COLOUR_MAP = "jet"  # drawing.overlay_png's, over 0..1
PAGE = "viewer-page"  # a folder of this package; the '-' keeps it from being a package itself
PAGE_FILES = ("index.html", "viewer.js", "viewer.css")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


def colour_scale(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] (any shape) -> uint8 RGBA (..., 4) of the overlays' colour map."""
  from matplotlib import colormaps

  return colormaps[COLOUR_MAP](np.clip(np.asarray(values, np.float64), 0.0, 1.0), bytes=True)


def png_bytes(pixels: np.ndarray) -> bytes:
  """uint8 (H, W) grey or (H, W, 4) RGBA -> PNG bytes."""
  if pixels.ndim == 3:
    pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
  ok, buf = cv2.imencode(".png", pixels)
  if not ok:
    raise ValueError(f"cannot encode a {pixels.shape} image as PNG")
  return buf.tobytes()


def data_uri(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay(saliency_map: np.ndarray) -> bytes:
  """One class's (N, N) map as an N x N RGBA PNG (the page stretches it over the image)."""
  rgba = colour_scale(saliency_map)
  rgba[..., 3] = round(255 * OVERLAY_ALPHA)
  return png_bytes(np.ascontiguousarray(rgba))


def safe_name(name: str) -> str:
  """An upload's name reduced to a plain file name (its suffix decides PNG / JPEG / DICOM)."""
  base = _SAFE_NAME.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).strip(" .")
  return base[-120:] or "upload"


class Viewer:
  """A loaded model answering uploads: `predict(name, data)` -> {'result', 'view'}."""

  def __init__(self, loaded: engine.LoadedModel):
    self.loaded = loaded
    self.model = trained_model.TrainedModel(loaded)  # predict's and lsemil.load's path
    self.classes = self.model.classes
    self.operating_points = self.model.operating_points
    self.calibration = self.model.calibration
    self.folder = Path(tempfile.mkdtemp(prefix="lsemil-serve-"))  # mode 0700
    self._lock = threading.Lock()
    # Compiles the one-image forward now: the first upload is answered at once.
    s = self.model.input_size
    self.model.forward(np.zeros((1, s, s, 1), np.uint8))

  def close(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)

  def info(self) -> dict:
    ops = self.operating_points
    return {
      "checkpoint": str(self.loaded.checkpoint),
      "step": int(self.loaded.step),
      "classes": list(self.classes),
      "operating_points": None if ops is None else {k: ops.get(k) for k in ("rule", "fit_split")},
      "calibration": None if self.calibration is None else self.calibration.get("method"),
      "box_tau": BOX_TAU,
      "colour_scale": data_uri(png_bytes(colour_scale(np.linspace(0, 1, 256))[None])),
    }

  def predict(self, name: str, data: bytes | io.BufferedIOBase, size: int | None = None) -> dict:
    """One uploaded file -> {'result': the JSON a user downloads, 'view': the page's images}.
    `data`: the bytes, or a stream of `size` bytes. ImageError naming `name` for a file that
    cannot be read (all of imageio's refusals)."""
    name = safe_name(name)
    with tempfile.TemporaryDirectory(dir=self.folder) as tmp:
      path = Path(tmp) / name
      with open(path, "wb") as f:
        if isinstance(data, bytes | bytearray):
          f.write(data)
        else:
          _copy(data, f, int(size or 0), name)
      with self._lock:  # one forward at a time; uploads stream in meanwhile
        failures = []
        got = readout.read_one(str(path), self.model.input_size, "first", True, failures)
        if got is None:
          raise ImageError(failures[0][1].replace(str(path), name))
        # boxes of every class (the page draws the one shown), at predict's --box-tau
        (found,) = self.model.findings(
          got[0][None], [got[2]], [name], threshold=-np.inf, box_tau=BOX_TAU
        )
    maps = found.saliency
    result = self.result(found)
    view = {
      "image": data_uri(png_bytes(got[1])),
      "overlays": {c: data_uri(overlay(maps[..., k])) for k, c in enumerate(self.classes)},
    }
    return {"result": result, "view": view}

  def result(self, found: trained_model.Prediction) -> dict:
    """The JSON of one file: per class (model order) the probability, the calibrated one,
    the decision at the stored threshold; boxes; the maps (N x N over the whole image)."""
    ops = self.operating_points
    thresholds = ops["thresholds"] if ops else [None] * len(self.classes)
    rows = [
      {
        "class": cls,
        "probability": found.probs[cls],
        "calibrated": None if found.calibrated is None else found.calibrated[cls],
        "threshold": thresholds[k],
        "decision": None if found.decisions is None else found.decisions[cls],
      }
      for k, cls in enumerate(self.classes)
    ]
    h, w = found.image_size
    maps = found.saliency
    return {
      "file": found.source,
      "checkpoint": str(self.loaded.checkpoint),
      "step": int(self.loaded.step),
      "image_size": {"height": int(h), "width": int(w)},
      "operating_points": None if ops is None else ops.get("rule"),
      "calibration": None if self.calibration is None else self.calibration.get("method"),
      "findings": rows,
      "box_tau": BOX_TAU,
      "boxes": {c: found.boxes.get(c, []) for c in self.classes},  # [] where p is NaN
      "saliency": {c: np.round(maps[..., k], 4).tolist() for k, c in enumerate(self.classes)},
    }

def _copy(src, dst, size: int, name: str, chunk: int = 1 << 20) -> None:
  left = size
  while left > 0:
    block = src.read(min(chunk, left))
    if not block:
      raise ImageError(f"{name}: upload ended after {size - left:,} of {size:,} bytes")
    dst.write(block)
    left -= len(block)


def inside(root: Path, url_path: str) -> Path:
  """The file of `root` that a /browse URL path names (percent-decoded once).

  Raises PermissionError for a path that would leave `root` ('..' or '.' parts, a
  backslash, NUL, a symlink resolving outside) and FileNotFoundError for a path inside that
  is no regular file. Empty parts are dropped ('/etc/passwd' names R/etc/passwd); 'x/'
  names x/index.html.
  """
  text = urllib.parse.unquote(url_path, errors="strict")
  parts = text.split("/")
  if "\0" in text or "\\" in text or any(p in ("..", ".") for p in parts):
    raise PermissionError(url_path)
  if text.endswith("/") or not text:
    parts.append("index.html")
  base = root.resolve()
  target = base.joinpath(*[p for p in parts if p]).resolve()
  if not target.is_relative_to(base):
    raise PermissionError(url_path)
  if not target.is_file():
    raise FileNotFoundError(url_path)
  return target


def page_file(name: str) -> bytes:
  """One of the page's own files (PAGE_FILES), from the package."""
  return (resources.files("lsemil.workflows") / PAGE / name).read_bytes()


_PAGE_POLICY = (
  "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
  "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
_REPORT_POLICY = "default-src 'self' 'unsafe-inline' data: blob:; object-src 'none'"


class Handler(http.server.BaseHTTPRequestHandler):
  """The routes of the module docstring (the server carries `viewer`, `browse`, `hosts`)."""

  server_version = "lsemil-serve"
  protocol_version = "HTTP/1.1"

  def log_message(self, format, *args) -> None:
    pass  # one line per request would bury the URL; failures are logged where they happen

  def _send(self, code: int, body: bytes, kind: str, policy: str = _PAGE_POLICY) -> None:
    self.send_response(code)
    self.send_header("Content-Type", kind)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Content-Security-Policy", policy)
    self.send_header("X-Content-Type-Options", "nosniff")
    self.send_header("Cache-Control", "no-store")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, code: int, obj: Mapping) -> None:
    self._send(code, json.dumps(obj).encode(), "application/json")

  def _error(self, code: int, message: str) -> None:
    self._json(code, {"error": message})

  def _host_ok(self) -> bool:
    hosts = self.server.hosts
    if hosts is None:
      return True
    host = urllib.parse.urlsplit("//" + (self.headers.get("Host") or "")).hostname
    return host in hosts

  def do_HEAD(self) -> None:
    self.do_GET()

  def do_GET(self) -> None:
    if not self._host_ok():
      return self._error(403, "unknown Host header")
    path = self.path.split("?", 1)[0].split("#", 1)[0]
    if path in ("/", "/index.html"):
      return self._send(200, page_file("index.html"), "text/html; charset=utf-8")
    if path.startswith("/static/") and path[len("/static/") :] in PAGE_FILES:
      name = path[len("/static/") :]
      return self._send(200, page_file(name), _kind(name))
    if path == "/api/info":
      return self._json(200, self.server.viewer.info() | {"browse": self.server.browse is not None})
    if path == "/browse" or path.startswith("/browse/"):
      return self._browse(path[len("/browse/") :])
    return self._error(404, f"{path}: not found")

  def _browse(self, rest: str) -> None:
    if self.server.browse is None:
      return self._error(404, "no folder to browse: start lsemil serve with --browse DIR")
    try:
      target = inside(self.server.browse, rest)
    except (PermissionError, UnicodeDecodeError):
      return self._error(403, "outside the served folder")
    except (FileNotFoundError, OSError):
      return self._error(404, f"/browse/{rest}: not found")
    self._send(200, target.read_bytes(), _kind(target.name), _REPORT_POLICY)

  def do_POST(self) -> None:
    self.close_connection = True  # one upload a connection: an answer before the body is read
    if not self._host_ok():
      return self._error(403, "unknown Host header")
    if self.path != "/api/predict":
      return self._error(404, f"{self.path}: not found")
    name = urllib.parse.unquote(self.headers.get("X-File-Name") or "")
    if not name:
      return self._error(400, "missing X-File-Name header (the page sends it)")
    try:
      size = int(self.headers.get("Content-Length") or "")
    except ValueError:
      return self._error(411, f"{safe_name(name)}: no Content-Length")
    if size > imageio.MAX_FILE_BYTES:
      return self._error(
        413, f"{safe_name(name)}: {size:,} bytes, above the limit of "
        f"{imageio.MAX_FILE_BYTES:,} bytes (lsemil.data.imageio.MAX_FILE_BYTES); not read",
      )  # fmt: skip
    try:
      answer = self.server.viewer.predict(name, self.rfile, size)
    except ImageError as e:
      log.warning(f"lsemil serve: {e}")
      return self._error(422, str(e))
    except OSError as e:  # the temporary folder full or gone
      log.warning(f"lsemil serve: {safe_name(name)}: cannot store the upload ({e})")
      return self._error(507, f"{safe_name(name)}: cannot store the upload on the server ({e})")
    self._json(200, answer)


def _kind(name: str) -> str:
  kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
  return kind + ("; charset=utf-8" if kind.startswith("text/") or kind.endswith("script") else "")


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  viewer: Viewer
  browse: Path | None
  hosts: tuple[str, ...] | None  # Host header names accepted; None: any (bound to all)

  def handle_error(self, request, client_address) -> None:
    """One line for a request that failed (a browser gone mid-upload), not a traceback; the
    server keeps serving."""
    error = sys.exc_info()[1]
    log.warning(f"lsemil serve: a request from {client_address[0]} failed: {error!r}")


class Server6(Server):
  address_family = socket.AF_INET6


def browse_folder(path: str | os.PathLike | None) -> Path | None:
  """The --browse folder resolved (symlinks followed), None for None; OutputError naming it
  when it is not a folder."""
  if path is None:
    return None
  if not Path(path).is_dir():
    raise OutputError(f"--browse {path}: not a folder")
  return Path(path).resolve()


def make_server(
  viewer: Viewer, host: str = "127.0.0.1", port: int = 0, browse: str | os.PathLike | None = None
) -> Server:
  """The viewer's HTTP server bound to host:port (port 0: a free one); `serve_forever` it.
  `browse`: a folder (a `reproduce` output) served under /browse/. OutputError naming the
  folder or the address when either is unusable."""
  browse = browse_folder(browse)
  kind = Server6 if ":" in host else Server
  try:
    server = kind((host.strip("[]"), int(port)), Handler)
  except OSError as e:
    raise OutputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
  server.viewer = viewer
  server.browse = browse
  anywhere = host in ("", "0.0.0.0", "::")
  server.hosts = None if anywhere else tuple({host.strip("[]"), *LOOPBACK})
  return server


def url(server: Server) -> str:
  host, port = server.server_address[:2]
  host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
  return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


@contextlib.contextmanager
def serving(viewer: Viewer, **options):
  """`make_server` for a `with` block: the server, closed with the viewer's temp folder."""
  try:
    server = make_server(viewer, **options)
  except BaseException:
    viewer.close()
    raise
  try:
    yield server
  finally:
    server.server_close()
    viewer.close()
