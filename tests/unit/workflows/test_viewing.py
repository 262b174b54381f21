"""lsemil.workflows.viewing without a server: the /browse containment rule, upload names, the
page's files (in the package data, nothing from the network) and the overlay colours. The
server itself runs in tests/system/test_serve_browser.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

from lsemil.workflows import viewing

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def root(tmp_path) -> Path:
  """R/index.html, R/figs/a.png, R/figs/index.html, a file beside R, links out of R."""
  r = tmp_path / "R"
  (r / "figs").mkdir(parents=True)
  for name in ("index.html", "figs/a.png", "figs/index.html"):
    (r / name).write_text(name)
  (tmp_path / "secret.txt").write_text("secret")
  (r / "out.txt").symlink_to(tmp_path / "secret.txt")
  (r / "up").symlink_to(tmp_path)
  (r / "in.png").symlink_to(r / "figs" / "a.png")  # a link that stays inside is fine
  return r


@pytest.mark.parametrize(
  "path, name",
  [("", "index.html"), ("index.html", "index.html"), ("figs/a.png", "figs/a.png"),
   ("figs/", "figs/index.html"), ("figs%2Fa.png", "figs/a.png"), ("in.png", "figs/a.png"),
   ("figs//a.png", "figs/a.png")],
)  # fmt: skip
def test_inside_serves_files_of_the_folder(root, path, name):
  assert viewing.inside(root, path) == (root / name).resolve()


@pytest.mark.parametrize(
  "path",
  ["../secret.txt", "%2e%2e/secret.txt", "%2E%2E%2Fsecret.txt", "figs/../../secret.txt",
   "figs/..%2F..%2Fsecret.txt", "out.txt", "up/secret.txt", "a%00.png",
   "figs%5C..%5C..%5Csecret.txt", "./index.html"],
)  # fmt: skip
def test_inside_refuses_every_way_out(root, path):
  with pytest.raises(PermissionError):
    viewing.inside(root, path)


@pytest.mark.parametrize("path", ["/etc/passwd", "%2Fetc%2Fpasswd", "missing.png", "figs"])
def test_absolute_and_missing_paths_name_nothing_outside(root, path):
  with pytest.raises(FileNotFoundError):  # '/etc/passwd' is R/etc/passwd: not there
    viewing.inside(root, path)


def test_inside_refuses_bytes_that_are_not_utf8(root):
  with pytest.raises(UnicodeDecodeError):  # the server answers 403
    viewing.inside(root, "%ff%fe.png")


@pytest.mark.parametrize(
  "name, safe",
  [("chest.png", "chest.png"), ("../../etc/passwd", "passwd"), ("C:\\x\\scan.dcm", "scan.dcm"),
   ("a<b>|c.jpg", "a_b_c.jpg"), ("", "upload"), ("..", "upload"), ("x/", "upload")],
)  # fmt: skip
def test_safe_name_keeps_a_plain_file_name(name, safe):
  assert viewing.safe_name(name) == safe


def test_page_files_are_package_data_and_load_nothing_from_the_network():
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  globs = pyproject["tool"]["setuptools"]["package-data"]["lsemil.workflows"]
  for name in viewing.PAGE_FILES:
    assert any(fnmatch.fnmatch(f"{viewing.PAGE}/{name}", g) for g in globs), name
    text = viewing.page_file(name).decode()
    urls = re.findall(r"(?:https?:)?//[\w.-]+", text.replace("http://www.w3.org/2000/svg", ""))
    assert urls == [], (name, urls)
  page = viewing.page_file("index.html").decode()
  assert set(re.findall(r'(?:src|href)="/static/([^"]+)"', page)) == {"viewer.js", "viewer.css"}


def test_overlay_is_the_colour_scale_at_half_alpha():
  scale = viewing.colour_scale(np.array([0.0, 0.5, 1.0, 7.0]))
  assert scale.dtype == np.uint8 and scale.shape == (4, 4)
  assert scale[0, 2] > scale[0, 0] and scale[2, 0] > scale[2, 2]  # jet: blue at 0, red at 1
  assert (scale[3] == scale[2]).all()  # clipped to [0, 1]
  s = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
  png = cv2.imdecode(np.frombuffer(viewing.overlay(s), np.uint8), cv2.IMREAD_UNCHANGED)
  assert png.shape == (4, 4, 4) and (png[..., 3] == 128).all()
  want = viewing.colour_scale(s)[..., :3]
  assert (cv2.cvtColor(png, cv2.COLOR_BGRA2RGBA)[..., :3] == want).all()
