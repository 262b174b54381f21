"""The paper's figures and the saliency overlay of `lsemil predict` (Yao et al. 2018, Sec 4.4).

  * `figure1` - Fig. 1: one image's saliency from models of target resolutions N, or one
    model's levels, side by side.
  * `figure3` - Fig. 3: image, ground-truth box, and each run's saliency with its DICE.
  * `overlay_png` - one saliency map over its image with its colour scale, optional boxes.

matplotlib's object API with the Agg canvas only (no pyplot state, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lsemil.data.nih import ORIGINAL_SIZE
from lsemil.metrics import overlap
from lsemil.reporting.paper_tables import display_class


class Figure3Case(TypedDict, total=False):
  """One row of Figure 3: a test image, one class's ground truth, and each run's saliency."""

  image: np.ndarray  # (H, W) grey image, any range (shown min..max)
  boxes: Sequence[Sequence[float]]  # ground-truth boxes (x, y, w, h) in source_size pixels
  source_size: float  # pixel space of the boxes; default 1024 (NIH originals)
  finding: str  # class name, shown at the start of the row
  saliency: Mapping[str, np.ndarray]  # run label -> that class's (n, n) saliency map in [0, 1]
  dice: Mapping[str, float]  # optional: run label -> DICE; else computed at 512 x 512


PANEL_INCHES = 2.5


DPI = 100


def grey_image(image) -> np.ndarray:
  """An (H, W) or (H, W, 1) image as an (H, W) float64 array (ValueError for other shapes)."""
  img = np.asarray(image, dtype=np.float64)
  if img.ndim == 3 and img.shape[-1] == 1:
    img = img[..., 0]
  if img.ndim != 2:
    raise ValueError(f"image must be (H, W) or (H, W, 1), got {img.shape}")
  return img


def literal(text) -> str:
  """`text` shown as written by matplotlib: a run label such as '$\\foo$' would be parsed as
  mathtext (and crash the figure after the whole evaluation)."""
  return str(text).replace("$", r"\$")


def _show(ax, image, saliency=None, title: str = "", alpha: float = 0.5, cmap: str = "jet"):
  """The grey image with the saliency map over it; returns the map's artist (None without)."""
  img = grey_image(image)
  h, w = img.shape
  ax.imshow(img, cmap="gray", interpolation="bilinear")
  shown = None
  if saliency is not None:
    # extent stretches the (n, n) map over the image, nearest = the model's upsampling.
    shown = ax.imshow(
      np.asarray(saliency, dtype=np.float64),
      cmap=cmap,
      alpha=alpha,
      vmin=0.0,
      vmax=1.0,
      interpolation="nearest",
      extent=(-0.5, w - 0.5, h - 0.5, -0.5),
    )
  ax.set_title(literal(title), fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])
  return shown


def _draw_boxes(ax, boxes, image_size, source_size, color: str = "lime"):
  """Boxes (x, y, w, h) in `source_size` pixels drawn on an image of `image_size` pixels;
  each size is a side or (height, width)."""
  sy, sx = np.broadcast_to(np.asarray(image_size, np.float64), 2) / np.broadcast_to(
    np.asarray(source_size, np.float64), 2
  )
  for x, y, w, h in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
    ax.add_patch(
      Rectangle((x * sx - 0.5, y * sy - 0.5), w * sx, h * sy, fill=False, edgecolor=color, lw=1.2)
    )


def _save(fig: Figure, path) -> Figure:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=DPI)
  return fig


def figure3(path, cases: Sequence[Figure3Case], runs: Sequence[str] | None = None) -> Figure:
  """Figure 3 (Sec 4.4): one row per case - image, ground-truth box, each run's saliency.

  Saliency is overlaid with the 'jet' colormap (0..1) at alpha 0.5 on the grey image; each
  saliency panel's title carries its DICE against the case's boxes (`overlap.box_dice` at
  512 x 512, nearest upsampling) unless the case gives it. `runs` fixes the column order
  (default: the first case's saliency keys, e.g. r0=0, r0=5, r0=10). Writes a PNG; returns the
  figure (one axis per panel).
  """
  if not cases:
    raise ValueError("figure3 needs at least one case")
  runs = list(runs if runs is not None else cases[0]["saliency"].keys())
  n_cols = 2 + len(runs)
  fig = Figure(figsize=(PANEL_INCHES * n_cols, PANEL_INCHES * len(cases)), layout="constrained")
  axes = fig.subplots(len(cases), n_cols, squeeze=False)
  for row, case in zip(axes, cases, strict=True):
    img = grey_image(case["image"])
    src = case.get("source_size", ORIGINAL_SIZE)
    boxes = case.get("boxes", [])
    finding = display_class(case.get("finding", ""))
    _show(row[0], img, title=finding or "image")
    _show(row[1], img, title="ground truth")
    _draw_boxes(row[1], boxes, img.shape[0], src)
    given = case.get("dice") or {}
    for ax, run in zip(row[2:], runs, strict=True):
      sal = case["saliency"].get(run)
      if sal is None:
        _show(ax, img, title=f"{run}: n/a")
        continue
      d = given.get(run)
      if d is None:
        d = overlap.box_dice(sal, boxes, size=512, source_size=src)
      _show(ax, img, sal, title=f"{run}  DICE {d:.3f}")
  return _save(fig, path)


def figure1(
  path,
  image,
  levels: Sequence[tuple[str, np.ndarray]],
  *,
  title: str = "image",
  boxes=None,
  source_size: float = ORIGINAL_SIZE,
) -> Figure:
  """Saliency maps of one image side by side: the image, then each map overlaid on it.

  Figure 1 of the paper: one model per target resolution N, each map at its own N
  (`lsemil reproduce --figure1`); also the per-level view of one model (figure_levels.png).
  levels: [(name, (n, n) map)] in the order to show; each panel's title is the name and the
  map's resolution. `boxes` (x, y, w, h) in `source_size` pixels are drawn on the image
  panel. Writes a PNG; returns the figure (one axis per panel).
  """
  fig = Figure(figsize=(PANEL_INCHES * (1 + len(levels)), PANEL_INCHES), layout="constrained")
  axes = fig.subplots(1, 1 + len(levels), squeeze=False)[0]
  img = grey_image(image)
  _show(axes[0], img, title=title)
  if boxes is not None:
    _draw_boxes(axes[0], boxes, img.shape[0], source_size)
  for ax, (name, sal) in zip(axes[1:], levels, strict=True):
    sal = np.asarray(sal)
    _show(ax, img, sal, title=f"{name} ({sal.shape[0]}x{sal.shape[1]})")
  return _save(fig, path)


def overlay_png(
  path, image, saliency, title: str = "", boxes=None, source_size=ORIGINAL_SIZE
) -> Figure:
  """One saliency map over its image (for `lsemil predict`) with its colour scale (0..1),
  optional boxes (x, y, w, h) in `source_size` pixels (a side, or the (height, width) of the
  file they were found in) drawn; a PNG. Returns the figure (the image axis, then the
  colour bar's)."""
  fig = Figure(figsize=(2 * PANEL_INCHES, 2 * PANEL_INCHES), layout="constrained")
  ax = fig.subplots()
  shown = _show(ax, image, saliency, title=title)
  if shown is not None:
    fig.colorbar(shown, ax=ax, shrink=0.8, label="saliency")
  if boxes is not None:
    _draw_boxes(ax, boxes, grey_image(image).shape, source_size)
  return _save(fig, path)

