"""Figures for the HTML report beyond the paper's: ROC curves, reliability diagrams, thumbnails.

  * `roc_curve` - the ROC points of one class (ties give diagonal segments, so the trapezoid
    area is exactly `classification.roc_auc`).
  * `roc_curves` - one panel per class of the run, every run's curve on it, AUC in the
    legend; a PNG.
  * `reliability_diagrams` - one panel per run: observed frequency against mean confidence
    over 15 equal-mass bins (`lsemil.metrics.calibration`, pooled over classes), raw and, when
    given, recalibrated, with the ECE; a PNG.
  * `thumbnail` - a small PNG (or JPEG) of an image with one saliency map and the ground-truth
    boxes, drawn with numpy and PIL (no matplotlib figure: the report's gallery has thousands).

matplotlib's object API with the Agg canvas only (no pyplot state, no display), as
`lsemil.reporting.drawing` does; PNGs are written with `fileio.write_bytes` (atomic, local or
gs://).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from lsemil.core import fileio
from lsemil.data.nih import ORIGINAL_SIZE
from lsemil.metrics import calibration, classification
from lsemil.reporting import drawing, paper_tables

PANEL_INCHES = 2.6
DPI = 100


def _write(fig: Figure, path) -> Figure:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  fileio.write_bytes(path, buf.getvalue())
  return fig


def roc_curve(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr) of one class at every distinct score, from (0, 0) to (1, 1).

  Thresholds run from the highest score down; tied scores move FPR and TPR together in one
  step, so joining the points with straight lines gives the area `classification.roc_auc` computes
  (ties count 1/2). Empty arrays when the class lacks positives or negatives.
  """
  y = np.asarray(y_true).ravel() > 0
  s = np.asarray(y_score, dtype=np.float64).ravel()
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return np.zeros(0), np.zeros(0)
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each tie group
  tp = np.cumsum(y)[last]
  fp = (last + 1) - tp
  return np.r_[0.0, fp / n_neg], np.r_[0.0, tp / n_pos]


def _grid(n: int, ncols: int) -> tuple[int, int]:
  ncols = max(1, min(ncols, n))
  return -(-n // ncols), ncols


def roc_curves(
  path,
  labels,
  runs: Sequence[tuple[str, np.ndarray]],
  classes: Sequence[str] | None = None,
  *,
  ncols: int = 4,
) -> Figure:
  """ROC curves per class, every run's curve on each class's panel (AUC in the legend).

  labels: (N, K) test labels; runs: [(label, (N, K) probabilities)] on the same images;
  classes: the K column names (the run's, `lsemil.data.findings.of_config`; None: 'class 1'
  ...). A class without positives or negatives shows 'n/a'. Writes a PNG; returns the figure
  (one axis per class).
  """
  y = np.asarray(labels)
  if classes is None:
    classes = [f"class {k + 1}" for k in range(y.shape[1])]
  if not runs:
    raise ValueError("roc_curves needs at least one run")
  rows, cols = _grid(len(classes), ncols)
  fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for k, (ax, name) in enumerate(zip(axes, classes, strict=False)):
    ax.plot([0, 1], [0, 1], color="0.75", lw=0.8, ls="--")
    for i, (label, probs) in enumerate(runs):
      fpr, tpr = roc_curve(y[:, k], np.asarray(probs)[:, k])
      if fpr.size:
        auc = classification.roc_auc(y[:, k], np.asarray(probs)[:, k])
        ax.plot(fpr, tpr, lw=1.1, color=f"C{i}", label=f"{drawing.literal(label)} {auc:.3f}")
    ax.set_title(paper_tables.display_class(name) + ("" if ax.lines[1:] else " (n/a)"), fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
    if ax.lines[1:]:
      ax.legend(fontsize=6, loc="lower right", title="AUC", title_fontsize=6)
  for ax in axes[len(classes) :]:
    ax.set_axis_off()
  for ax in axes[(rows - 1) * cols :]:
    ax.set_xlabel("false positive rate", fontsize=7)
  for ax in axes[::cols]:
    ax.set_ylabel("true positive rate", fontsize=7)
  return _write(fig, path)


def reliability_diagrams(
  path,
  labels,
  runs: Sequence[tuple[str, np.ndarray]],
  *,
  fitted: Mapping[str, np.ndarray] | None = None,
  fitted_name: str = "fitted",
  n_bins: int = calibration.N_BINS,
  ncols: int = 3,
) -> Figure:
  """One reliability diagram per run, pooled over classes (every (image, class) prediction).

  labels: (N, K); runs: [(label, (N, K) raw probabilities)]; fitted: {label: (N, K)
  recalibrated probabilities} drawn on the same panel (e.g. after a temperature fit on the
  validation split). Points: mean confidence vs observed frequency of each equal-mass bin,
  the diagonal is perfect calibration; the legend gives each curve's ECE. Most NIH
  predictions sit near 0; equal-mass bins put most points there rather than leave bins empty.
  Writes a PNG; returns the figure (one axis per run).
  """
  if not runs:
    raise ValueError("reliability_diagrams needs at least one run")
  y = np.asarray(labels)
  fitted = fitted or {}
  rows, cols = _grid(len(runs), ncols)
  fig = Figure(figsize=(1.3 * PANEL_INCHES * cols, 1.3 * PANEL_INCHES * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (label, probs) in zip(axes, runs, strict=False):
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="perfect")
    curves = [("raw", probs, "C0", "o")]
    if label in fitted:
      curves.append((fitted_name, fitted[label], "C1", "s"))
    for name, p, color, marker in curves:
      r = calibration.reliability(p, y, n_bins)
      e = calibration.ece(p, y, n_bins)
      ok = r["count"] > 0
      ax.plot(
        r["confidence"][ok],
        r["frequency"][ok],
        marker=marker,
        ms=3.5,
        lw=1.1,
        color=color,
        label=f"{name} ECE {e:.3f}",
      )
    ax.set_title(drawing.literal(label), fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted probability", fontsize=7)
    ax.set_ylabel("observed frequency", fontsize=7)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left")
  for ax in axes[len(runs) :]:
    ax.set_axis_off()
  return _write(fig, path)


def _to_unit(image) -> np.ndarray:
  img = drawing.grey_image(image)
  lo, hi = float(img.min()), float(img.max())
  return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def thumbnail(
  image,
  saliency=None,
  boxes=None,
  *,
  source_size: float = ORIGINAL_SIZE,
  size: int = 160,
  alpha: float = 0.5,
  box_color: tuple[int, int, int] = (0, 255, 0),
  format: str = "png",
  quality: int = 85,
) -> bytes:
  """Encoded bytes of a (size x size) thumbnail: the grey image (shown min..max), a saliency
  map in [0, 1] overlaid with 'jet' at `alpha` (nearest upsampling, as the model's), and the
  ground-truth boxes (x, y, w, h) in `source_size` pixels as outlines. format: 'png' (exact
  pixels) or 'jpeg' (at `quality`; about a fifth of the bytes, for galleries of ~1000 images).
  """
  img = _to_unit(image)
  h, w = img.shape
  rgb = np.repeat(img[..., None], 3, axis=-1)
  if saliency is not None:
    s = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, 1.0)
    rows = np.minimum(((np.arange(h) + 0.5) * s.shape[0] / h).astype(np.int64), s.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * s.shape[1] / w).astype(np.int64), s.shape[1] - 1)
    heat = matplotlib.colormaps["jet"](s[np.ix_(rows, cols)])[..., :3]
    rgb = (1.0 - alpha) * rgb + alpha * heat
  pil = Image.fromarray(np.round(rgb * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
  if boxes is not None:
    draw = ImageDraw.Draw(pil)
    sx, sy = size / float(source_size), size / float(source_size)
    for x, y, bw, bh in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
      draw.rectangle(
        [x * sx, y * sy, (x + bw) * sx - 1, (y + bh) * sy - 1], outline=box_color, width=2
      )
  buf = io.BytesIO()
  if format == "png":
    pil.save(buf, format="PNG")
  elif format == "jpeg":
    pil.save(buf, format="JPEG", quality=quality)
  else:
    raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
  return buf.getvalue()
