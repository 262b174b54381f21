"""A synthetic dataset in the exact NIH ChestX-ray14 layout (the demo's and the tests' data).

`lsemil synth --out D [--patients N] [--size 512|1024] [--seed S]` writes phantom chest
radiographs with planted findings of the 14 classes (paper Section 4.1, Table 1) as

  D/images/<patient:08d>_<follow-up:03d>.png   8-bit grayscale, size x size
  D/Data_Entry_2017_v2020.csv                   the real header; labels joined by '|'
  D/BBox_List_2017.csv                          the real header; one box per planted finding of
                                                the 8 box classes on every test image
  D/train_val_list.txt, D/test_list.txt         a patient-wise split (25% of patients test)
  D/lsemil_dataset.json                         {"kind": "synthetic", "image_size": size,
                                                 "box_space": size, ...}

so `lsemil.data.nih.load_index` reads it through the same code path as the real release. Box
coordinates are pixels of the stored image (`box_space` = size), and each box is the bounding
box of exactly the pixels its finding changes.

Each class has its own shape, texture and intensity (nodule: small bright disc; mass: larger
lobulated blob; cardiomegaly: enlarged heart; effusion: white meniscus at a lung base; ...),
sized so that the smallest stays >= 5 px across at 128x128, at random positions within an
anatomically plausible region. About 40% of images have no finding, the others 1-3.

Every image is a pure function of (seed, patient, follow-up), whatever the worker count:
images are written to a temporary name and renamed, existing ones are skipped on a re-run, and
the metadata files are written last. `render_image` is the hook the tests use to draw an image
with any subset of its findings.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import functools
import io
import json
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from lsemil.core import fileio, log
from lsemil.core.errors import DataError
from lsemil.data import imageio
from lsemil.data.nih import BOX_CLASSES, CLASSES, MARKER_NAME, NUM_CLASSES

# The first lines of NIH's files, byte for byte (BBox_List's 'Bbox [x,y,w,h]' spans 4 columns).
DATA_ENTRY_HEADER = (
  "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
  "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
DATA_ENTRY_NAME = "Data_Entry_2017_v2020.csv"
BBOX_NAME = "BBox_List_2017.csv"
PARAMS_NAME = ".lsemil_synth.json"  # written first, so a resumed run can check its settings
GENERATOR_VERSION = 1

TEST_FRACTION = 0.25  # of the patients
NO_FINDING_P = 0.4
NUM_FINDINGS_P = (0.5, 0.3, 0.2)  # 1, 2 or 3 findings on an abnormal image
# Relative frequency of each class among findings (NIH order); gives about 5-13% prevalence.
CLASS_WEIGHTS = np.array(
  [1.2, 0.9, 1.3, 1.6, 1.0, 1.0, 0.8, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.75]
)
SIZES = (512, 1024)
_BOX_SET = frozenset(CLASSES.index(c) for c in BOX_CLASSES)
_NIH_BOX_LABEL = {"Infiltration": "Infiltrate"}


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """One planned image: its id, patient, follow-up number, planted classes and split."""

  image_id: str
  patient: int
  follow_up: int
  classes: tuple[int, ...]  # sorted class indices (NIH order); empty = 'No Finding'
  split: str  # "train_val" or "test"
  age: int
  gender: str
  view: str


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng([seed, *key])


def plan(patients: int, seed: int) -> list[ImageSpec]:
  """The deterministic list of images for `patients` patients (1-4 images each).

  The plan for N patients is a prefix of the plan for more patients with the same seed.
  """
  if patients < 1:
    raise ValueError(f"patients must be >= 1, got {patients}")
  order = _rng(seed, 1 << 21).permutation(patients)
  n_test = max(1, int(round(TEST_FRACTION * patients))) if patients > 1 else 0
  test = set((order[:n_test] + 1).tolist())
  weights = CLASS_WEIGHTS / CLASS_WEIGHTS.sum()
  specs = []
  for pid in range(1, patients + 1):
    r = _rng(seed, pid, 1 << 20)
    n_images = int(r.integers(1, 5))
    age = int(r.integers(18, 80))
    gender = "M" if r.random() < 0.55 else "F"
    for fu in range(n_images):
      if r.random() < NO_FINDING_P:
        classes = ()
      else:
        k = int(r.choice(len(NUM_FINDINGS_P), p=NUM_FINDINGS_P)) + 1
        classes = tuple(sorted(r.choice(NUM_CLASSES, size=k, replace=False, p=weights).tolist()))
      view = "PA" if r.random() < 0.75 else "AP"
      specs.append(
        ImageSpec(
          image_id=f"{pid:08d}_{fu:03d}.png",
          patient=pid,
          follow_up=fu,
          classes=classes,
          split="test" if pid in test else "train_val",
          age=min(age + fu // 2, 95),
          gender=gender,
          view=view,
        )
      )
  return specs


# --------------------------------------------------------------------------- anatomy


@dataclasses.dataclass(frozen=True)
class _Ellipse:
  cx: float
  cy: float
  ax: float
  ay: float
  angle: float = 0.0  # degrees, as cv2.ellipse

  def alpha(self, xx, yy, soft: float = 1.0) -> np.ndarray:
    """Soft inside-mask on a grid: 1 inside, 0 outside, a ramp `soft` pixels wide."""
    t = np.deg2rad(self.angle)
    dx, dy = xx - self.cx, yy - self.cy
    u = (dx * np.cos(t) + dy * np.sin(t)) / self.ax
    v = (-dx * np.sin(t) + dy * np.cos(t)) / self.ay
    rho = np.sqrt(u * u + v * v)
    return np.clip((1.0 - rho) * min(self.ax, self.ay) / soft + 0.5, 0.0, 1.0).astype(np.float32)

  def draw(self, img, value: float, thickness: int = -1, arc=(0, 360), offset=(0, 0)):
    center = (int(round(self.cx - offset[0])), int(round(self.cy - offset[1])))
    axes = (max(1, int(round(self.ax))), max(1, int(round(self.ay))))
    cv2.ellipse(img, center, axes, self.angle, arc[0], arc[1], float(value), thickness, cv2.LINE_AA)


@dataclasses.dataclass(frozen=True)
class _Anatomy:
  size: int
  cx: float
  s: float  # body scale in pixels (about 0.9 * size)
  body: _Ellipse
  lungs: tuple[_Ellipse, _Ellipse]  # image-left lung first (the patient's right)
  heart: _Ellipse
  air: float
  body_level: float
  lung_level: float
  heart_level: float
  spine_level: float
  rib_amp: float
  gain: float
  offset: float
  noise: float

  def lateral(self, side: int) -> int:
    """The image-x direction from the midline towards the chest wall of lung `side`."""
    return -1 if side == 0 else 1


def _anatomy(spec: ImageSpec, size: int, seed: int) -> _Anatomy:
  p = _rng(seed, spec.patient, 1 << 20, 1)  # patient build, shared by follow-ups
  r = _rng(seed, spec.patient, spec.follow_up, 0)  # this exposure
  s = size * p.uniform(0.86, 0.98) * r.uniform(0.97, 1.03)
  cx = size * (0.5 + r.uniform(-0.025, 0.025))
  cy = size * (0.47 + r.uniform(-0.02, 0.02))
  lung_w, lung_h = p.uniform(0.14, 0.16), p.uniform(0.27, 0.31)
  tilt = r.uniform(-3, 3)
  lungs = tuple(
    _Ellipse(cx + sgn * 0.2 * s, cy, lung_w * s, lung_h * s, tilt + sgn * p.uniform(2, 6))
    for sgn in (-1, 1)
  )
  heart = _Ellipse(
    cx + 0.045 * s, cy + 0.17 * s, p.uniform(0.11, 0.125) * s, p.uniform(0.085, 0.1) * s, -10
  )
  body = _Ellipse(cx, cy + 0.12 * s, 0.47 * s, 0.62 * s)
  return _Anatomy(
    size=size,
    cx=cx,
    s=s,
    body=body,
    lungs=lungs,
    heart=heart,
    air=r.uniform(5, 25),
    body_level=r.uniform(135, 160),
    lung_level=r.uniform(45, 70),
    heart_level=r.uniform(140, 160),
    spine_level=r.uniform(170, 190),
    rib_amp=r.uniform(14, 24),
    gain=r.uniform(0.85, 1.15),
    offset=r.uniform(-12, 12),
    noise=r.uniform(1.5, 4.0),
  )


def _background(a: _Anatomy, rng: np.random.Generator) -> np.ndarray:
  """The chest phantom without findings: body, lungs with ribs, spine, heart; float32."""
  n = a.size
  img = np.full((n, n), a.air, np.float32)
  a.body.draw(img, a.body_level)
  lung_mask = np.zeros((n, n), np.float32)
  for lung in a.lungs:
    lung.draw(img, a.lung_level)
    lung.draw(lung_mask, 1.0)
  ribs = np.zeros((n, n), np.float32)
  thick = max(2, int(round(0.014 * a.s)))
  for side, lung in enumerate(a.lungs):
    lat = a.lateral(side)
    for k in range(9):
      y = lung.cy - lung.ay * 1.05 + k * lung.ay * 0.24 + rng.uniform(-2, 2)
      rib = _Ellipse(lung.cx - lat * 0.1 * a.s, y, lung.ax * 1.5, 0.06 * a.s, lat * 8)
      rib.draw(ribs, 1.0, thick, (180, 360))
  img += a.rib_amp * ribs * lung_mask
  w = 0.035 * a.s
  cv2.rectangle(
    img, (int(a.cx - w), 0), (int(a.cx + w), n - 1), float(a.spine_level), -1, cv2.LINE_AA
  )
  a.heart.draw(img, a.heart_level)
  clav_y = a.lungs[0].cy - a.lungs[0].ay * 0.95
  for sgn in (-1, 1):
    p0 = (int(a.cx + sgn * 0.05 * a.s), int(clav_y))
    p1 = (int(a.cx + sgn * 0.36 * a.s), int(clav_y - 0.06 * a.s))
    cv2.line(img, p0, p1, float(a.spine_level - 20), max(2, int(0.02 * a.s)), cv2.LINE_AA)
  img = cv2.GaussianBlur(img, (0, 0), 0.004 * n)
  shade = cv2.resize(rng.standard_normal((5, 5)).astype(np.float32), (32, 32),
                     interpolation=cv2.INTER_CUBIC)
  img += cv2.resize(6.0 * shade, (n, n), interpolation=cv2.INTER_LINEAR)
  return img


@functools.cache
def _noise_bank(size: int) -> np.ndarray:
  # One fixed field per size; images take shifted windows of it (cheaper than fresh noise).
  return np.random.default_rng(0x5EED).standard_normal((2 * size, 2 * size), np.float32)


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
  oy, ox = rng.integers(0, size, 2)
  win = _noise_bank(size)[oy : oy + size, ox : ox + size]
  return win[::-1] if rng.random() < 0.5 else win


# --------------------------------------------------------------------------- findings


@dataclasses.dataclass
class _Patch:
  """A finding's contribution on a window: `add` + `alpha` * (`target` - background)."""

  x0: int
  y0: int
  add: np.ndarray | None = None
  alpha: np.ndarray | None = None
  target: float = 0.0

  def finalize(self) -> _Patch:
    # Exact zeros outside the visible support make the box the set of changed pixels.
    if self.add is not None:
      self.add = np.where(np.abs(self.add) >= 2.0, self.add, 0.0).astype(np.float32)
    if self.alpha is not None:
      self.alpha = np.where(self.alpha >= 0.03, self.alpha, 0.0).astype(np.float32)
    return self

  @property
  def support(self) -> np.ndarray:
    sup = np.zeros(self.shape, bool)
    if self.add is not None:
      sup |= self.add != 0
    if self.alpha is not None:
      sup |= self.alpha != 0
    return sup

  @property
  def shape(self) -> tuple[int, int]:
    arr = self.add if self.add is not None else self.alpha
    return arr.shape

  def apply(self, out: np.ndarray, bg: np.ndarray):
    h, w = self.shape
    win = (slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w))
    if self.add is not None:
      out[win] += self.add
    if self.alpha is not None:
      out[win] += self.alpha * (self.target - bg[win])


def _window(a: _Anatomy, x_lo, x_hi, y_lo, y_hi):
  """A clipped pixel window and its broadcastable coordinate grids."""
  n = a.size
  x0, x1 = max(0, int(np.floor(x_lo))), min(n, int(np.ceil(x_hi)) + 1)
  y0, y1 = max(0, int(np.floor(y_lo))), min(n, int(np.ceil(y_hi)) + 1)
  xx = np.arange(x0, x1, dtype=np.float32)[None, :]
  yy = np.arange(y0, y1, dtype=np.float32)[:, None]
  return x0, y0, xx, yy


def _lung_point(rng, a: _Anatomy, side: int, u_range, v_range) -> tuple[float, float]:
  """A point of lung `side`: u from medial (-1) to lateral (+1), v from apex (-1) to base (+1)."""
  lung = a.lungs[side]
  for _ in range(100):
    u, v = rng.uniform(*u_range), rng.uniform(*v_range)
    if u * u + v * v <= 0.72:
      break
  return lung.cx + a.lateral(side) * u * lung.ax, lung.cy + v * lung.ay


def _texture(rng, shape, cell: float) -> np.ndarray:
  """Smooth random texture with features about `cell` pixels across, roughly in [-1, 1]."""
  h, w = shape
  g = rng.standard_normal((max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)))
  return cv2.resize(g.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)


def _lungs_alpha(a: _Anatomy, xx, yy, soft=2.0) -> np.ndarray:
  return np.maximum(a.lungs[0].alpha(xx, yy, soft), a.lungs[1].alpha(xx, yy, soft))


def _atelectasis(rng, a: _Anatomy) -> list[_Patch]:
  # A bright wedge with its apex towards the hilum and its base at the chest wall.
  side = int(rng.integers(2))
  lung, lat = a.lungs[side], a.lateral(side)
  apex = np.array([lung.cx - lat * 0.35 * lung.ax, lung.cy + rng.uniform(-0.1, 0.45) * lung.ay])
  ang = np.deg2rad(rng.uniform(-15, 35))
  length = rng.uniform(0.13, 0.17) * a.s
  d = np.array([lat * np.cos(ang), np.sin(ang)])
  base = apex + length * d
  half = rng.uniform(0.03, 0.04) * a.s
  normal = np.array([-d[1], d[0]])
  tri = np.stack([apex, base + half * normal, base - half * normal])
  lo, hi = tri.min(0) - 4, tri.max(0) + 4
  x0, y0, xx, yy = _window(a, lo[0], hi[0], lo[1], hi[1])
  poly = np.zeros((yy.shape[0], xx.shape[1]), np.float32)
  cv2.fillConvexPoly(poly, np.round(tri - [x0, y0]).astype(np.int32), 1.0, cv2.LINE_AA)
  poly = cv2.GaussianBlur(poly, (0, 0), 1.2)
  add = rng.uniform(60, 75) * poly * lung.alpha(xx, yy, 2.0)
  return [_Patch(x0, y0, add=add)]


def _cardiomegaly(rng, a: _Anatomy) -> list[_Patch]:
  h = a.heart
  big = _Ellipse(
    h.cx + rng.uniform(-0.01, 0.02) * a.s, h.cy + 0.01 * a.s, h.ax * rng.uniform(1.5, 1.7),
    h.ay * rng.uniform(1.3, 1.45), h.angle,
  )
  x0, y0, xx, yy = _window(a, big.cx - big.ax - 3, big.cx + big.ax + 3,
                           big.cy - big.ay - 3, big.cy + big.ay + 3)
  return [_Patch(x0, y0, alpha=big.alpha(xx, yy, 2.0), target=a.heart_level + 8)]


def _effusion(rng, a: _Anatomy) -> list[_Patch]:
  # Fluid fills the lung base up to a meniscus that rises towards the chest wall.
  side = int(rng.integers(2))
  lung, lat = a.lungs[side], a.lateral(side)
  level = lung.cy + lung.ay * rng.uniform(0.45, 0.65)
  rise = rng.uniform(0.05, 0.08) * a.s
  x0, y0, xx, yy = _window(a, lung.cx - lung.ax - 2, lung.cx + lung.ax + 2,
                           level - rise - 3, lung.cy + lung.ay + 2)
  t = np.clip((lat * (xx - lung.cx) / lung.ax + 1) / 2, 0, 1)
  surface = level - rise * t * t
  below = np.clip((yy - surface) / 2.0 + 0.5, 0, 1)
  return [_Patch(x0, y0, alpha=below * lung.alpha(xx, yy, 2.0), target=rng.uniform(150, 170))]


def _infiltration(rng, a: _Anatomy) -> list[_Patch]:
  # Many small fluffy patches scattered over a large part of one lung.
  side = int(rng.integers(2))
  cx, cy = _lung_point(rng, a, side, (-0.4, 0.4), (-0.5, 0.5))
  region = _Ellipse(cx, cy, rng.uniform(0.09, 0.12) * a.s, rng.uniform(0.11, 0.15) * a.s)
  x0, y0, xx, yy = _window(a, cx - region.ax, cx + region.ax, cy - region.ay, cy + region.ay)
  tex = _texture(rng, (yy.shape[0], xx.shape[1]), 0.03 * a.s)
  patches = np.clip((tex - 0.1) / 0.5, 0, 1)
  env = region.alpha(xx, yy, 0.02 * a.s) * a.lungs[side].alpha(xx, yy, 2.0)
  return [_Patch(x0, y0, add=rng.uniform(45, 55) * patches * env)]


def _mass(rng, a: _Anatomy) -> list[_Patch]:
  side = int(rng.integers(2))
  cx, cy = _lung_point(rng, a, side, (-0.5, 0.5), (-0.6, 0.5))
  r0 = rng.uniform(0.05, 0.07) * a.s
  x0, y0, xx, yy = _window(a, cx - 1.4 * r0, cx + 1.4 * r0, cy - 1.4 * r0, cy + 1.4 * r0)
  theta = np.arctan2(yy - cy, xx - cx)
  rho = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
  radius = r0 * (1 + sum(rng.uniform(0, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                         for k in range(2, 6)))
  inside = np.clip((radius - rho) / 1.5 + 0.5, 0, 1)
  mottle = 1 + 0.12 * _texture(rng, inside.shape, 0.3 * r0)
  return [_Patch(x0, y0, add=rng.uniform(65, 80) * inside * mottle)]


def _nodule(rng, a: _Anatomy) -> list[_Patch]:
  side = int(rng.integers(2))
  cx, cy = _lung_point(rng, a, side, (-0.7, 0.7), (-0.7, 0.6))
  r = rng.uniform(0.026, 0.032) * a.size  # >= 6.5 px across at 128x128
  x0, y0, xx, yy = _window(a, cx - r - 2, cx + r + 2, cy - r - 2, cy + r + 2)
  rho2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)
  disc = np.clip((1 - np.sqrt(rho2)) * r / 1.0 + 0.5, 0, 1)
  return [_Patch(x0, y0, add=rng.uniform(95, 110) * disc * (0.85 + 0.15 * np.clip(1 - rho2, 0, 1)))]


def _pneumonia(rng, a: _Anatomy) -> list[_Patch]:
  # One fuzzy, mottled cloud with blurred edges.
  side = int(rng.integers(2))
  cx, cy = _lung_point(rng, a, side, (-0.4, 0.5), (-0.3, 0.6))
  sx, sy = rng.uniform(0.045, 0.06) * a.s, rng.uniform(0.05, 0.065) * a.s
  x0, y0, xx, yy = _window(a, cx - 2.4 * sx, cx + 2.4 * sx, cy - 2.4 * sy, cy + 2.4 * sy)
  cloud = np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
  mottle = np.clip(0.75 + 0.35 * _texture(rng, cloud.shape, 0.05 * a.s), 0.3, 1.2)
  add = rng.uniform(85, 100) * cloud * mottle * a.lungs[side].alpha(xx, yy, 3.0)
  return [_Patch(x0, y0, add=add)]


def _pneumothorax(rng, a: _Anatomy) -> list[_Patch]:
  # Air between chest wall and a collapsed lung: dark, no rib or lung markings, at the apex.
  side = int(rng.integers(2))
  lung, lat = a.lungs[side], a.lateral(side)
  fx, fy = rng.uniform(0.68, 0.8), rng.uniform(0.75, 0.85)
  col = _Ellipse(lung.cx - lat * lung.ax * (1 - fx), lung.cy + lung.ay * (1 - fy),
                 lung.ax * fx, lung.ay * fy, lung.angle)
  y_hi = lung.cy + rng.uniform(0.0, 0.3) * lung.ay
  x0, y0, xx, yy = _window(a, lung.cx - lung.ax - 2, lung.cx + lung.ax + 2,
                           lung.cy - lung.ay - 2, y_hi)
  upper = np.clip((y_hi - 6 - yy) / 4.0, 0, 1)
  alpha = lung.alpha(xx, yy, 1.5) * (1 - col.alpha(xx, yy, 1.5)) * upper
  w = 0.009 * a.s
  grown = _Ellipse(col.cx, col.cy, col.ax + w, col.ay + w, col.angle)
  ring = grown.alpha(xx, yy, 1.0) - col.alpha(xx, yy, 1.0)
  line = rng.uniform(50, 60) * ring * lung.alpha(xx, yy, 1.5) * upper
  return [_Patch(x0, y0, add=line, alpha=alpha, target=a.air + rng.uniform(10, 20))]


def _consolidation(rng, a: _Anatomy) -> list[_Patch]:
  # A dense, homogeneous opacity with one straight (fissure) edge; hides the ribs.
  side = int(rng.integers(2))
  cx, cy = _lung_point(rng, a, side, (-0.4, 0.4), (-0.2, 0.6))
  e = _Ellipse(cx, cy, rng.uniform(0.065, 0.085) * a.s, rng.uniform(0.075, 0.1) * a.s,
               rng.uniform(-30, 30))
  x0, y0, xx, yy = _window(a, cx - e.ax - 4, cx + e.ax + 4, cy - e.ay - 4, cy + e.ay + 4)
  th = rng.uniform(0, 2 * np.pi)
  d = rng.uniform(0.0, 0.35) * min(e.ax, e.ay)
  half = np.clip((d - ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th))) + 0.5, 0, 1)
  alpha = e.alpha(xx, yy, 2.0) * half * a.lungs[side].alpha(xx, yy, 2.0)
  return [_Patch(x0, y0, alpha=alpha, target=a.lung_level + rng.uniform(75, 90))]


def _edema(rng, a: _Anatomy) -> list[_Patch]:
  # Symmetric perihilar ("bat wing") haze in both lungs.
  amp = rng.uniform(55, 65)
  sx, sy = rng.uniform(0.05, 0.06) * a.s, rng.uniform(0.08, 0.1) * a.s
  dy = rng.uniform(-0.05, 0.15)
  out = []
  for side, lung in enumerate(a.lungs):
    cx = lung.cx - a.lateral(side) * 0.4 * lung.ax
    cy = lung.cy + dy * lung.ay
    x0, y0, xx, yy = _window(a, cx - 2.5 * sx, cx + 2.5 * sx, cy - 2.5 * sy, cy + 2.5 * sy)
    haze = np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2))
    out.append(_Patch(x0, y0, add=amp * haze * lung.alpha(xx, yy, 3.0)))
  return out


def _emphysema(rng, a: _Anatomy) -> list[_Patch]:
  # Hyperinflated, hyperlucent lungs: darker and extended towards the diaphragm.
  amp = rng.uniform(28, 36)
  grow = rng.uniform(0.1, 0.15)
  out = []
  for lung in a.lungs:
    big = _Ellipse(lung.cx, lung.cy + grow * lung.ay, lung.ax * 1.04, lung.ay * (1 + grow),
                   lung.angle)
    x0, y0, xx, yy = _window(a, big.cx - big.ax - 3, big.cx + big.ax + 3,
                             lung.cy - lung.ay - 3, big.cy + big.ay + 3)
    inside = lung.alpha(xx, yy, 2.0)
    ext = np.clip(big.alpha(xx, yy, 2.0) - inside, 0, 1)
    target = a.lung_level + 0.3 * a.rib_amp - amp  # the darkened lung's mean, ribs included
    out.append(_Patch(x0, y0, add=-amp * inside, alpha=ext, target=target))
  return out


def _fibrosis(rng, a: _Anatomy) -> list[_Patch]:
  # A reticular net of thin bright lines in the periphery of one or both lungs.
  sides = (0, 1) if rng.random() < 0.6 else (int(rng.integers(2)),)
  amp = rng.uniform(65, 80)
  thick = max(2, int(round(0.009 * a.s)))
  out = []
  for side in sides:
    cx, cy = _lung_point(rng, a, side, (0.1, 0.5), (-0.3, 0.5))
    region = _Ellipse(cx, cy, rng.uniform(0.07, 0.09) * a.s, rng.uniform(0.09, 0.12) * a.s)
    x0, y0, xx, yy = _window(a, cx - region.ax, cx + region.ax, cy - region.ay, cy + region.ay)
    net = np.zeros((yy.shape[0], xx.shape[1]), np.float32)
    h, w = net.shape
    for _ in range(int(rng.integers(22, 32))):
      p = rng.uniform([0, 0], [w, h])
      ang = rng.uniform(0, np.pi)
      q = p + rng.uniform(0.03, 0.06) * a.s * np.array([np.cos(ang), np.sin(ang)])
      cv2.line(net, tuple(int(v) for v in p), tuple(int(v) for v in q), 1.0, thick, cv2.LINE_AA)
    env = region.alpha(xx, yy, 0.015 * a.s) * a.lungs[side].alpha(xx, yy, 2.0)
    out.append(_Patch(x0, y0, add=amp * np.minimum(net, 1.0) * env))
  return out


def _pleural_thickening(rng, a: _Anatomy) -> list[_Patch]:
  # A bright band along the chest wall, following the lung's lateral outline.
  side = int(rng.integers(2))
  lung, lat = a.lungs[side], a.lateral(side)
  mid = (180.0 if lat < 0 else 0.0) + lat * rng.uniform(-45, 35)
  span = rng.uniform(20, 30)
  thick = max(3, int(round(rng.uniform(0.045, 0.055) * a.size)))
  x0, y0, xx, yy = _window(a, lung.cx - lung.ax - thick, lung.cx + lung.ax + thick,
                           lung.cy - lung.ay - thick, lung.cy + lung.ay + thick)
  band = np.zeros((yy.shape[0], xx.shape[1]), np.float32)
  inner = _Ellipse(lung.cx, lung.cy, lung.ax - thick / 3, lung.ay - thick / 3, lung.angle)
  inner.draw(band, 1.0, thick, (mid - span, mid + span), offset=(x0, y0))
  band = cv2.GaussianBlur(band, (0, 0), 1.0)
  return [_Patch(x0, y0, alpha=band, target=rng.uniform(165, 180))]


def _hernia(rng, a: _Anatomy) -> list[_Patch]:
  # A round retrocardiac/subdiaphragmatic sac: bright rim, air cap over a fluid level.
  base = max(lung.cy + lung.ay for lung in a.lungs)
  r = rng.uniform(0.05, 0.065) * a.s
  cx = a.cx + rng.uniform(-0.08, 0.08) * a.s
  cy = min(base + rng.uniform(0.02, 0.07) * a.s, a.size - r - 3)
  x0, y0, xx, yy = _window(a, cx - r - 3, cx + r + 3, cy - r - 3, cy + r + 3)
  disc = _Ellipse(cx, cy, r, r).alpha(xx, yy, 1.5)
  inner = _Ellipse(cx, cy, 0.8 * r, 0.8 * r).alpha(xx, yy, 1.5)
  level = cy + rng.uniform(-0.15, 0.15) * r
  air = inner * np.clip((level - yy) / 1.5 + 0.5, 0, 1)
  add = 55 * (disc - inner) + 35 * (inner - air)
  return [_Patch(x0, y0, add=add, alpha=air, target=a.air + 30)]


_FINDINGS = (
  _atelectasis,
  _cardiomegaly,
  _effusion,
  _infiltration,
  _mass,
  _nodule,
  _pneumonia,
  _pneumothorax,
  _consolidation,
  _edema,
  _emphysema,
  _fibrosis,
  _pleural_thickening,
  _hernia,
)


def _finding_patches(spec: ImageSpec, a: _Anatomy, seed: int, cls: int) -> list[_Patch]:
  rng = _rng(seed, spec.patient, spec.follow_up, 100 + cls)
  return [p.finalize() for p in _FINDINGS[cls](rng, a)]


def _bbox(patches: Sequence[_Patch]) -> tuple[int, int, int, int] | None:
  """(x, y, w, h) of the union of the patches' supports, or None if nothing shows."""
  xs, ys = [], []
  for p in patches:
    yy, xx = np.nonzero(p.support)
    xs += [p.x0 + xx.min(), p.x0 + xx.max()] if len(xx) else []
    ys += [p.y0 + yy.min(), p.y0 + yy.max()] if len(yy) else []
  if not xs:
    return None
  return int(min(xs)), int(min(ys)), int(max(xs) - min(xs) + 1), int(max(ys) - min(ys) + 1)


def render_image(
  spec: ImageSpec, *, size: int, seed: int, findings: Iterable[int] | None = None,
  pixels: bool = True,
) -> tuple[np.ndarray | None, dict[int, tuple[int, int, int, int]]]:
  """Draws one image with some of its planted findings (the tests' hook).

  Args:
    spec: the planned image.
    size: side of the square image in pixels.
    seed: the dataset seed.
    findings: the class indices to draw, a subset of `spec.classes`; None draws all. The
      background and noise do not depend on this choice, so pixels differ only where a drawn
      finding changes them.
    pixels: False skips the drawing and returns only the boxes.

  Returns:
    (uint8 image of shape (size, size) or None, {class: (x, y, w, h)}), each box the bounding
    box of the pixels its finding changes, in pixels of this image.
  """
  classes = spec.classes if findings is None else tuple(findings)
  if not set(classes) <= set(spec.classes):
    raise ValueError(f"{spec.image_id}: findings {classes} not all planted in {spec.classes}")
  a = _anatomy(spec, size, seed)
  patches = {c: _finding_patches(spec, a, seed, c) for c in classes}
  boxes = {c: b for c, ps in patches.items() if (b := _bbox(ps)) is not None}
  if not pixels:
    return None, boxes
  bg = _background(a, _rng(seed, spec.patient, spec.follow_up, 1))
  img = bg.copy()
  for ps in patches.values():
    for p in ps:
      p.apply(img, bg)
  noise = _noise(_rng(seed, spec.patient, spec.follow_up, 2), size)
  # gain * img + noise * sigma + offset, rounded and saturated to uint8 in one pass.
  return cv2.addWeighted(img, a.gain, noise, a.noise, a.offset, dtype=cv2.CV_8U), boxes


# --------------------------------------------------------------------------- writing


def _is_done(path: Path, size: int) -> bool:
  """An image already written: a complete PNG of the right size. Renames make every image
  this module writes complete; a file truncated, emptied or replaced since is redone."""
  try:
    data = path.read_bytes()
  except OSError:  # absent, a folder, a symlink loop
    return False
  return imageio.is_complete_png(data) and imageio.png_header(data)[:2] == (size, size)


def _render_chunk(args) -> list[tuple[str, dict]]:
  specs, out_dir, size, seed = args
  images = Path(out_dir) / "images"
  results = []
  for spec in specs:
    path = images / spec.image_id
    done = _is_done(path, size)
    img, boxes = render_image(spec, size=size, seed=seed, pixels=not done)
    if not done:
      # Huffman-only level 1: the fastest PNG encoding, and the smallest for noisy images.
      flags = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
               cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
      ok, png = cv2.imencode(".png", img, flags)
      if not ok:
        raise RuntimeError(f"cannot encode {spec.image_id} as PNG")
      fileio.write_bytes(path, png.tobytes())
    results.append((spec.image_id, boxes))
  return results


def _data_entry_csv(specs: Sequence[ImageSpec], size: int) -> bytes:
  buf = io.StringIO()
  buf.write(DATA_ENTRY_HEADER + "\n")
  w = csv.writer(buf, lineterminator="\n")
  spacing = repr(0.143 * 1024 / size)
  for s in specs:
    labels = "|".join(sorted(CLASSES[c] for c in s.classes)) or "No Finding"
    w.writerow([s.image_id, labels, s.follow_up, s.patient, s.age, s.gender, s.view, size, size,
                spacing, spacing])
  return buf.getvalue().encode()


def _bbox_csv(specs: Sequence[ImageSpec], boxes: dict[str, dict]) -> bytes:
  buf = io.StringIO()
  buf.write(BBOX_HEADER + "\n")
  w = csv.writer(buf, lineterminator="\n")
  for s in specs:
    if s.split != "test":
      continue
    for c in s.classes:
      if c in _BOX_SET:
        x, y, bw, bh = boxes[s.image_id][c]
        name = _NIH_BOX_LABEL.get(CLASSES[c], CLASSES[c])
        w.writerow([s.image_id, name, float(x), float(y), float(bw), float(bh)])
  return buf.getvalue().encode()


def synthesize(
  out_dir: str | os.PathLike, *, patients: int = 600, size: int = 512, seed: int = 0,
  workers: int | None = None, progress: log.Progress | None = None,
) -> Path:
  """Writes (or completes) a synthetic NIH-layout dataset in `out_dir` and returns its path.

  Args:
    out_dir: the dataset folder (created if needed).
    patients: number of patients, each with 1-4 images.
    size: side of the square images (512 or 1024).
    seed: the dataset seed; each image depends only on it and the image's id.
    workers: processes to render with; None uses up to 2 (the CPU count), 1 renders in-process.
    progress: told of each image rendered, as 'synth'.
  """
  if size not in SIZES:
    raise DataError(f"size must be one of {SIZES}, got {size}")
  out = Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  params = {"generator": GENERATOR_VERSION, "patients": patients, "size": size, "seed": seed}
  params_path = out / PARAMS_NAME
  if params_path.is_file():
    old = json.loads(params_path.read_text())
    if old != params:
      raise DataError(
        f"{out} holds a synthetic dataset made with {old}, not {params}; use another --out"
      )
  else:
    fileio.write_bytes(params_path, json.dumps(params).encode())

  for stale in (out / "images").glob(".*.tmp*"):  # left by an interrupted run
    stale.unlink()
  specs = plan(patients, seed)
  workers = min(2, os.cpu_count() or 1) if workers is None else max(1, workers)
  chunk = 8
  tasks = [(specs[i : i + chunk], str(out), size, seed) for i in range(0, len(specs), chunk)]
  boxes: dict[str, dict] = {}
  done = 0
  if progress:
    progress("synth", done, len(specs))
  if workers == 1:
    results = map(_render_chunk, tasks)
    pool = None
  else:
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    results = pool.map(_render_chunk, tasks)
  try:
    for res in results:
      boxes.update(res)
      done += len(res)
      if progress:
        progress("synth", done, len(specs))
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)

  train_val = sorted(s.image_id for s in specs if s.split == "train_val")
  test = sorted(s.image_id for s in specs if s.split == "test")
  fileio.write_bytes(out / DATA_ENTRY_NAME, _data_entry_csv(specs, size))
  fileio.write_bytes(out / BBOX_NAME, _bbox_csv(specs, boxes))
  fileio.write_bytes(out / "train_val_list.txt", "\n".join(train_val).encode())
  fileio.write_bytes(out / "test_list.txt", "\n".join(test).encode())
  marker = {"kind": "synthetic", "image_size": size, "box_space": size, **params}
  fileio.write_bytes(out / MARKER_NAME, (json.dumps(marker, indent=2) + "\n").encode())
  return out
