"""The single-resolution, post-hoc baseline the paper argues against (Sec 2.2, 2.3).

`GlobalAveragePoolingClassifier`: the MIL model's stem and down path (Sec 3.1, the same
residual blocks, `lsemil.models.mil.ResidualBlock`, with the same parameter names), then global
average pooling of the coarsest level and one linear head, sigmoid per class. No horizontal
flow, no up path, no MIL pooling: localization comes afterwards from CAM or Grad-CAM of that
one resolution (`lsemil.models.posthoc`).

`__call__(x, train)` returns {'probs': (B, K), 'logits': (B, K), 'features': the coarsest
level (B, h, w, C), 'levels': every level's features, fine to coarse}, so `lsemil.training.trainer`
trains it unchanged (it reads out['probs']). Each level passes through `self.perturb(
'level<l>', ...)`, a no-op unless a 'perturbations' collection is given: Grad-CAM
differentiates the class logits with respect to it (`lsemil.models.posthoc`).

Build from `config.model` with `from_config` (configs/baseline_gap.py: `arch = 'gap'`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from lsemil.core.errors import ConfigError
from lsemil.models import mil

ARCH = "gap"


def level_sides(m: Any) -> tuple[int, ...]:
  """Side of each level, fine to coarse: input_size / stem_stride / 2**l."""
  return tuple(int(m.input_size) // int(m.stem_stride) // 2**lv for lv in range(len(m.widths)))


def validate(cfg: Any) -> tuple[int, ...]:
  """Checks the GAP model's fields (as `lsemil.models.mil.validate`); returns the level sides."""

  def fail(field: str, msg: str):
    raise ConfigError(f"model config: {field}: {msg}")

  get = (lambda f: cfg[f]) if isinstance(cfg, dict) else (lambda f: getattr(cfg, f))
  for field in (
    "num_classes",
    "input_size",
    "stem_stride",
    "stem_features",
    "bottleneck_ratio",
    "group_norm_groups",
  ):
    v = get(field)
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or v < 1:
      fail(field, f"must be an integer >= 1, got {v!r}")
  if get("arch") != ARCH:
    fail("arch", f"must be {ARCH!r} for this model, got {get('arch')!r}")
  size, widths, blocks = (
    int(get("input_size")),
    tuple(get("widths")),
    tuple(get("blocks_per_level")),
  )
  if size < 8 or size & (size - 1):
    fail("input_size", f"must be a power of two >= 8, got {size}")
  if int(get("stem_stride")) not in (1, 2, 4):
    fail("stem_stride", f"must be 1, 2 or 4, got {get('stem_stride')}")
  if not widths:
    fail("widths", "needs at least one level")
  if len(blocks) != len(widths):
    fail("blocks_per_level", f"has {len(blocks)} entries but widths has {len(widths)}")
  stride = int(get("stem_stride"))
  sides = tuple(size // stride // 2**lv for lv in range(len(widths)))
  if sides[-1] < 1:
    fail("widths", f"{len(widths)} levels reduce a {size}px input below one pixel")
  for field, choices in (
    ("norm", mil.NORMS),
    ("dtype", tuple(mil.DTYPES)),
    ("batch_norm_impl", mil.BATCH_NORM_IMPLS),
    ("conv1x1_impl", mil.CONV1X1_IMPLS),
    ("conv_weight_grad", mil.CONV_WEIGHT_GRADS),
    ("stem_impl", mil.STEM_IMPLS),
    ("remat_policy", tuple(mil.REMAT_POLICIES)),
  ):
    if get(field) not in choices:
      fail(field, f"unknown {get(field)!r}; choose one of {choices}")
  if get("norm") == "group":
    groups = int(get("group_norm_groups"))
    ratio = int(get("bottleneck_ratio"))
    chans = {int(get("stem_features"))} | {int(w) for w in widths}
    chans |= {max(int(w) // ratio, 1) for w in widths}
    bad = sorted(c for c in chans if c % groups)
    if bad:
      fail("group_norm_groups", f"{groups} groups do not divide the channels {bad}")
  return sides


class GlobalAveragePoolingClassifier(mil.Backbone):
  """Down path + global average pooling + linear head (the Grad-CAM / CAM baseline).

  Fields are those of `lsemil.models.mil.Backbone`, shared with the MIL model (their values
  are in configs/paper.py, the only place they are written), plus `arch` ('gap').
  """

  arch: str = ARCH
  # Read by the trainer's LSE-LBA sharpness metric (`lsemil.training.trainer`): not LSE-LBA.
  pooling: ClassVar[str] = "gap"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
    validate(self)
    if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, 1):
      raise ValueError(
        f"expected images shaped (B, {self.input_size}, {self.input_size}, 1), got {x.shape}"
      )
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) * (1.0 / 255.0)
    conv, norm, residual = mil.layer_fns(self, train)
    levels = mil.down_path(
      self, x.astype(mil.DTYPES[self.dtype]), conv, norm, residual, perturb=self.perturb
    )
    pooled = jnp.mean(levels[-1].astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)
    return {
      "probs": nn.sigmoid(logits),
      "logits": logits,
      "features": levels[-1],
      "levels": tuple(levels),
    }


def from_config(cfg: Any) -> GlobalAveragePoolingClassifier:
  """Builds the model from `config.model` (a ConfigDict or mapping with arch = 'gap')."""
  what = f"model config (arch {ARCH!r})"
  values = mil.fields_from_config(GlobalAveragePoolingClassifier, cfg, what)
  model = GlobalAveragePoolingClassifier(**values, arch=cfg.get("arch", ARCH))
  validate(model)
  return model
