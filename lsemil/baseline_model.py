"""The single-resolution, post-hoc baseline the paper argues against (Sec 2.2, 2.3; issue 12).

`GlobalAveragePoolingClassifier`: the MIL model's stem and down path (Sec 3.1, the same
residual blocks, `lsemil.model.ResidualBlock`, with the same parameter names), then global
average pooling of the coarsest level and one linear head, sigmoid per class. No horizontal
flow, no up path, no MIL pooling: localization comes afterwards from CAM or Grad-CAM of that
one resolution (`lsemil.cam`).

`__call__(x, train)` returns {'probs': (B, K), 'logits': (B, K), 'features': the coarsest
level (B, h, w, C), 'levels': every level's features, fine to coarse}, so `lsemil.train`
trains it unchanged (it reads out['probs']). Each level passes through `self.perturb(
'level<l>', ...)`, a no-op unless a 'perturbations' collection is given: Grad-CAM
differentiates the class logits with respect to it (`lsemil.cam`).

Build from `config.model` with `from_config` (configs/baseline_gap.py: `arch = 'gap'`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from lsemil import layers
from lsemil import model as model_lib
from lsemil.errors import ConfigError

ARCH = "gap"
# The same tables as lsemil.model's private _DTYPES / _NORMS.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("batch", "group")


def layer_fns(m: Any, train: bool) -> tuple[Callable, Callable, Any]:
  """(conv, norm, residual block) of `MultiResolutionMIL.__call__`, for module fields `m`."""
  dtype = DTYPES[m.dtype]
  conv = functools.partial(
    layers.Conv,
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    dot_1x1=m.conv1x1_impl == "dot",
    weight_grad=model_lib.resolve_weight_grad(m.conv_weight_grad),
  )
  if m.norm == "batch":
    fused = model_lib.resolve_batch_norm(m.batch_norm_impl) == "fused"
    bn = layers.BatchNorm if fused else nn.BatchNorm
    norm = functools.partial(
      bn, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
    )
  else:
    norm = functools.partial(nn.GroupNorm, num_groups=m.group_norm_groups, dtype=dtype)
  residual = nn.remat(model_lib.ResidualBlock) if m.remat else model_lib.ResidualBlock
  return conv, norm, residual


def down_path(
  m: Any, x: jax.Array, conv, norm, residual, perturb: Callable | None = None
) -> list[jax.Array]:
  """Stem and down path of Sec 3.1, as in `MultiResolutionMIL`; call inside a compact method.

  Submodules get the MIL model's names (stem, stem_norm, down<l>, res<l>_<b>). `perturb`
  (a module's `self.perturb`) wraps each level's output as 'level<l>'. Returns the levels,
  fine to coarse.
  """
  transform = "none" if m.stem_impl == "conv" else m.stem_impl
  h = conv(m.stem_features, (7, 7), strides=m.stem_stride, input_transform=transform, name="stem")(
    x
  )
  h = nn.relu(norm(name="stem_norm")(h))
  levels = []
  for level, (width, blocks) in enumerate(zip(m.widths, m.blocks_per_level, strict=True)):
    if level > 0:
      h = residual(width, 2, m.bottleneck_ratio, conv, norm, name=f"down{level}")(h)
    for b in range(blocks):
      h = residual(width, 1, m.bottleneck_ratio, conv, norm, name=f"res{level}_{b}")(h)
    if perturb is not None:
      h = perturb(f"level{level}", h)
    levels.append(h)
  return levels


def level_sides(m: Any) -> tuple[int, ...]:
  """Side of each level, fine to coarse: input_size / stem_stride / 2**l."""
  return tuple(int(m.input_size) // int(m.stem_stride) // 2**lv for lv in range(len(m.widths)))


def validate(cfg: Any) -> tuple[int, ...]:
  """Checks the GAP model's fields (as `lsemil.model.validate`); returns the level sides."""

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
    ("norm", NORMS),
    ("dtype", tuple(DTYPES)),
    ("batch_norm_impl", model_lib.BATCH_NORM_IMPLS),
    ("conv1x1_impl", model_lib.CONV1X1_IMPLS),
    ("conv_weight_grad", model_lib.CONV_WEIGHT_GRADS),
    ("stem_impl", model_lib.STEM_IMPLS),
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


class GlobalAveragePoolingClassifier(nn.Module):
  """Down path + global average pooling + linear head (the Grad-CAM / CAM baseline).

  Fields are the down-path fields of `lsemil.model.MultiResolutionMIL` (documented in
  configs/paper.py) plus `arch` ('gap').
  """

  num_classes: int = 14
  input_size: int = 512
  stem_stride: int = 2
  stem_features: int = 32
  widths: Sequence[int] = (32, 64, 128, 256, 512, 512)
  blocks_per_level: Sequence[int] = (1, 1, 1, 1, 1, 1)
  bottleneck_ratio: int = 4
  norm: str = "batch"
  group_norm_groups: int = 16
  dtype: str = "float32"
  remat: bool = False
  batch_norm_impl: str = "auto"
  conv1x1_impl: str = "dot"
  conv_weight_grad: str = "xla"
  stem_impl: str = "conv"
  arch: str = ARCH
  # Read by the trainer's LSE-LBA sharpness metric (train._sharpness): not LSE-LBA.
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
    conv, norm, residual = layer_fns(self, train)
    levels = down_path(
      self, x.astype(DTYPES[self.dtype]), conv, norm, residual, perturb=self.perturb
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
  fields = {f.name for f in dataclasses.fields(GlobalAveragePoolingClassifier)}
  fields -= {"parent", "name"}
  unknown = set(cfg.keys()) - fields
  if unknown:
    raise ConfigError(f"model config (arch {ARCH!r}): unknown fields {sorted(unknown)}")
  values = {k: cfg[k] for k in cfg.keys()}
  for key in ("widths", "blocks_per_level"):
    if key in values:
      values[key] = tuple(int(v) for v in values[key])
  model = GlobalAveragePoolingClassifier(**values)
  validate(model)
  return model
