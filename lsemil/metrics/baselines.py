"""Model-free saliency maps: what a model's map must beat on the weak-localization protocols.

Scored by `lsemil.metrics.localization.score_all` beside the models' maps (Table 4), for every
case of a split:

- `constant_maps`: the best constant map of Sec 4.2, c* = sqrt(|G| / A) (the oracle of
  `overlap.uniform_dice`: it knows the box area);
- `centre_prior_maps`: one fixed Gaussian over the lungs (`CENTRE_PRIOR`, fractions of the
  image), the same map for every image and class.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from lsemil.metrics import overlap
from lsemil.metrics.localization import EVAL_SIZE, Case

# Centre prior: a Gaussian at (cx, cy) with standard deviations (sx, sy), fractions of the image
# width / height; covers both lungs of a PA chest film (and of lsemil.data.phantoms's phantoms).
CENTRE_PRIOR = {"cx": 0.5, "cy": 0.46, "sx": 0.2, "sy": 0.18}


def centre_prior(n: int) -> np.ndarray:
  """(n, n) Gaussian over the lungs (`CENTRE_PRIOR`) at pixel centres, peak 1 at (cx, cy)."""
  p = CENTRE_PRIOR
  c = (np.arange(n) + 0.5) / n
  gx = np.exp(-0.5 * ((c - p["cx"]) / p["sx"]) ** 2)
  gy = np.exp(-0.5 * ((c - p["cy"]) / p["sy"]) ** 2)
  return np.outer(gy, gx)  # rows are y


def centre_prior_maps(cases: Iterable[Case], n: int = 64) -> dict[tuple[int, int], np.ndarray]:
  """{(row, class): the centre prior} for every case (one shared array)."""
  m = centre_prior(n)
  return {(c.row, c.cls): m for c in cases}


def constant_maps(
  cases: Iterable[Case], box_space: float, *, size: int = EVAL_SIZE, n: int = 8
) -> dict[tuple[int, int], np.ndarray]:
  """{(row, class): (n, n) map = c*}: the best constant of `overlap.uniform_dice`,
  c* = sqrt(|G| / A) on the size x size grid, per case (an oracle of the box area)."""
  out = {}
  for c in cases:
    g = overlap.boxes_to_mask(c.boxes, size, box_space)
    out[(c.row, c.cls)] = np.full((n, n), np.sqrt(g.sum() / g.size))
  return out

