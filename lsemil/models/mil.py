"""The multi-resolution MIL model of Yao et al. 2018 (Sec 3, Fig. 2), in flax.linen.

Data flow, NHWC throughout, for an input `(B, H, H, 1)`: float in [0, 1], or uint8 in
[0, 255] (what the input pipeline sends; scaled to [0, 1] here, on the device):

1. Stem: a 7x7 conv with stride `stem_stride` -> level 0 at H / stem_stride pixels.
2. Down path (Sec 3.1): level l (l >= 1) starts with a strided residual block
   F^{l+1} = relu(g(F^l) + f(F^l)) (g a strided bottleneck, f a strided 1x1 projection)
   that halves the side and (typically) doubles the channels, followed by
   `blocks_per_level[l]` identity residual blocks F_{m+1} = relu(g(F_m) + F_m).
   Level l has side H / stem_stride / 2**l.
3. Horizontal flow (Sec 3.2, Eq. 2): on every level whose side is <= N (the levels that
   are fused into the saliency map) a DenseNet block F_{m+1} = relu(f(F_1 + ... + F_m))
   (+ is channel concatenation), no identity skip. Levels finer than N only feed the
   down path.
4. Up path (Sec 3.3, Eq. 3): from the coarsest level, F = f(U(F^{l+1}) + F^l) with U the
   nearest-neighbour x2 upsampling and f `up_convs` 3x3 conv-norm-relu refinements,
   repeated until the level whose side is N.
5. Head (Sec 3.6): a 1x1 conv shared over the N^2 instances gives K logits per instance,
   sigmoid gives the saliency map S in [0, 1]^(N x N x K), and the configured pooling
   (LSE-LBA by default, Eq. 4) turns each class map into a probability.

`__call__` returns {'probs': (B, K), 'saliency': (B, N, N, K), 'saliency_levels': tuple
of (B, n_l, n_l, K) maps, coarse to fine, one per fused level: the shared head applied
to each level's fused features, for the multi-resolution figure (Fig. 1); only the last,
`saliency`, enters the loss}.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from lsemil.core.errors import ConfigError
from lsemil.models import layers, pooling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("batch", "group")
# Implementation choices (speed only; same parameters, same sums up to float rounding).
BATCH_NORM_IMPLS = ("auto", "fused", "flax")
CONV1X1_IMPLS = ("dot", "conv")
CONV_WEIGHT_GRADS = ("xla", "gemm", "auto")
STEM_IMPLS = ("conv", "space_to_depth", "pad8")
# How a DenseNet block (Eq. 2) and an up-path step (Eq. 3) read their concatenated inputs.
DENSE_IMPLS = ("auto", "concat", "split", "buffer")
UP_IMPLS = ("auto", "concat", "split")
# What `remat` keeps for the backward pass (jax.checkpoint policies): nothing (recompute
# each block's forward), dots (the conv and dot outputs; norms and relus recomputed).
REMAT_POLICIES = {
  "nothing": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The resolved structure of a model config: what `validate` derived."""

  level_sides: tuple[int, ...]  # side of each level, fine to coarse
  fused_levels: tuple[int, ...]  # level indices in the up path, fine (side N) to coarse


def _channels_normalised(cfg: Any, sides: tuple[int, ...]) -> dict[str, int]:
  """Every channel count a norm layer sees, keyed by where it comes from (for GroupNorm)."""
  ratio = int(cfg.bottleneck_ratio)
  out = {"stem_features": int(cfg.stem_features)}
  for level, (width, blocks) in enumerate(zip(cfg.widths, cfg.blocks_per_level, strict=True)):
    if level > 0 or int(blocks) > 0:  # level 0 without blocks is the stem output itself
      out[f"widths[{level}]"] = int(width)
      out[f"widths[{level}] // bottleneck_ratio"] = max(int(width) // ratio, 1)
  if int(cfg.dense_layers) > 0:
    out["dense_growth"] = int(cfg.dense_growth)
  out["up_features"] = int(cfg.up_features)
  return out


def validate(cfg: Any) -> ModelSpec:
  """Checks a model config and derives the level sides; raises ConfigError naming the field.

  Runs on the host before anything is traced or compiled: every config it accepts builds.
  """

  def fail(field: str, msg: str):
    raise ConfigError(f"model config: {field}: {msg}")

  def integer(field: str, minimum: int) -> int:
    value = cfg[field] if isinstance(cfg, dict) else getattr(cfg, field)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
      fail(field, f"must be an integer, got {value!r}")
    if int(value) < minimum:
      fail(field, f"must be >= {minimum}, got {value}")
    return int(value)

  for field, minimum in (
    ("num_classes", 1),
    ("stem_features", 1),
    ("bottleneck_ratio", 1),
    ("dense_layers", 0),
    ("dense_growth", 1),
    ("up_features", 1),
    ("up_convs", 0),
    ("group_norm_groups", 1),
  ):
    integer(field, minimum)
  size, stride, n = integer("input_size", 1), integer("stem_stride", 1), integer("saliency_size", 1)
  widths, blocks = tuple(cfg.widths), tuple(cfg.blocks_per_level)
  for field, values, minimum in (("widths", widths, 1), ("blocks_per_level", blocks, 0)):
    for v in values:
      if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or v < minimum:
        fail(field, f"entries must be integers >= {minimum}, got {values}")
  if size < 8 or size & (size - 1):
    fail("input_size", f"must be a power of two >= 8, got {size}")
  if stride not in (1, 2, 4):
    fail("stem_stride", f"must be 1, 2 or 4, got {stride}")
  if not widths:
    fail("widths", "needs at least one level")
  if len(blocks) != len(widths):
    fail("blocks_per_level", f"has {len(blocks)} entries but widths has {len(widths)}")
  if n & (n - 1) or n < 8:
    fail("saliency_size", f"must be a power of two >= 8, got {n}")
  if n > size:
    fail("saliency_size", f"N={n} exceeds the input size {size}")
  sides = tuple(size // stride // 2**level for level in range(len(widths)))
  if sides[-1] < 1:
    fail("widths", f"{len(widths)} levels reduce a {size}px input below one pixel")
  if n not in sides:
    fail(
      "saliency_size",
      f"N={n} is not reached by any level (level sides {sides}); change stem_stride, "
      "widths (the number of levels) or saliency_size",
    )
  fused = tuple(level for level, side in enumerate(sides) if side <= n)
  if len(fused) > 1 and int(cfg.up_convs) < 1:
    # The one shared head W reads every fused level: each needs up_features channels.
    fail("up_convs", f"must be >= 1 when {len(fused)} levels are fused, got {cfg.up_convs}")
  if cfg.pooling not in pooling.POOLINGS:
    fail("pooling", f"unknown {cfg.pooling!r}; choose one of {pooling.POOLINGS}")
  if cfg.pooling == "lse_lba" and float(cfg.r0) < 0:
    fail("r0", f"the sharpness prior must be >= 0, got {cfg.r0}")
  if cfg.pooling in ("lse", "generalized_mean") and float(cfg.r0) <= 0:
    fail("r0", f"{cfg.pooling} needs r = r0 > 0, got {cfg.r0}")
  if cfg.norm not in NORMS:
    fail("norm", f"unknown {cfg.norm!r}; choose one of {NORMS}")
  if cfg.dtype not in DTYPES:
    fail("dtype", f"unknown {cfg.dtype!r}; choose one of {tuple(DTYPES)}")
  for field, choices in (
    ("batch_norm_impl", BATCH_NORM_IMPLS),
    ("conv1x1_impl", CONV1X1_IMPLS),
    ("conv_weight_grad", CONV_WEIGHT_GRADS),
    ("stem_impl", STEM_IMPLS),
    ("dense_impl", DENSE_IMPLS),
    ("up_impl", UP_IMPLS),
    ("remat_policy", tuple(REMAT_POLICIES)),
  ):
    # Absent (a model config without the field) is reported by from_config, naming it.
    value = cfg.get(field) if isinstance(cfg, dict) else getattr(cfg, field, None)
    if value is not None and value not in choices:
      fail(field, f"unknown {value!r}; choose one of {choices}")
  if cfg.norm == "group":
    groups = int(cfg.group_norm_groups)
    bad = {k: c for k, c in _channels_normalised(cfg, sides).items() if c % groups}
    if bad:
      where = ", ".join(f"{k} = {c}" for k, c in bad.items())
      fail("group_norm_groups", f"{groups} groups do not divide the channels of {where}")
  return ModelSpec(level_sides=sides, fused_levels=fused)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling U of Eq. (3): each pixel becomes a factor x factor block."""
  return jnp.repeat(jnp.repeat(x, factor, axis=-3), factor, axis=-2)


class ResidualBlock(nn.Module):
  """F' = relu(g(F) + f(F)) (Sec 3.1), g a bottleneck 1x1 -> 3x3 -> 1x1.

  With strides 2, f is a strided 1x1 projection (the down-sampling block); with stride
  1 and equal channels, f is the identity (the resolution-preserving block).
  """

  features: int
  strides: int
  bottleneck_ratio: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inner = max(self.features // self.bottleneck_ratio, 1)
    y = nn.relu(self.norm()(self.conv(inner, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(inner, (3, 3), strides=self.strides)(y)))
    # Zero-init the last norm's scale so each block starts near f(F) (flax imagenet).
    y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.features, (1, 1))(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = self.norm()(self.conv(self.features, (1, 1), strides=self.strides, name="proj")(x))
    return nn.relu(x + y)


class DenseBlock(nn.Module):
  """F_{m+1} = relu(f(F_1 + ... + F_m)) (Sec 3.2, Eq. 2), + the channel concatenation.

  f is conv3x3-norm; there is no identity skip, so f cannot be bypassed. Returns the
  concatenation of the input and all new maps, as in DenseNet. `impl` (a resolved
  `dense_impl`) is how f reads the growing concatenation: 'concat' forms it for each layer;
  'split' never forms it (f's conv is the sum of each map's conv, `layers.Conv` over a
  list; the block returns the list of maps); 'buffer' writes each new map into one
  preallocated tensor (shared storage, Pleiss et al. 2017), read by convs whose kernels are
  zero over the channels not yet written. Same parameters, same sums up to float rounding.
  """

  layers: int
  growth: int
  conv: Any
  norm: Any
  impl: str = "concat"

  @nn.compact
  def __call__(self, x: jax.Array) -> Any:
    if self.impl == "buffer":
      width = x.shape[-1]
      out = jnp.pad(x, ((0, 0),) * 3 + ((0, self.layers * self.growth),))
      for m in range(self.layers):
        start = width + m * self.growth
        y = nn.relu(self.norm()(self.conv(self.growth, (3, 3))(out, in_features=start)))
        out = lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), start, axis=-1)
      return out
    features = [x]
    for _ in range(self.layers):
      y = features if self.impl == "split" else jnp.concatenate(features, axis=-1)
      features.append(nn.relu(self.norm()(self.conv(self.growth, (3, 3))(y))))
    return features if self.impl == "split" else jnp.concatenate(features, axis=-1)


class FuseUp(nn.Module):
  """One up-path step, Eq. (3): f(U(F^{l+1}) + F^l), f = `convs` conv3x3-norm-relu.

  `fine` is an array or a list of maps standing for their concatenation (a 'split' dense
  block). `impl` (a resolved `up_impl`): 'concat' forms U(F^{l+1}) and the concatenation;
  'split' never does: f's first conv reads F^{l+1} at its own resolution and the fine maps
  apart (`layers.Conv` with `coarse`). Same parameters, same sums up to float rounding.
  """

  features: int
  convs: int
  conv: Any
  norm: Any
  impl: str = "concat"

  @nn.compact
  def __call__(self, coarse: jax.Array, fine: Any) -> jax.Array:
    fine = list(fine) if isinstance(fine, list | tuple) else [fine]
    if self.impl == "split":
      x = self.conv(self.features, (3, 3))(fine, coarse=coarse.astype(fine[0].dtype))
      x = nn.relu(self.norm()(x))
    else:
      x = jnp.concatenate([upsample_nearest(coarse).astype(fine[0].dtype), *fine], axis=-1)
    for _ in range(self.convs - (self.impl == "split")):
      x = nn.relu(self.norm()(self.conv(self.features, (3, 3))(x)))
    return x


def layer_fns(m: Any, train: bool) -> tuple[Any, Any, Any]:
  """(conv, norm, residual block) factories for a module with the model fields `m`
  (dtype, norm, speed options; configs/paper.py), shared by `MultiResolutionMIL` and the
  GAP baseline (`lsemil.models.gap_classifier`)."""
  dtype = DTYPES[m.dtype]
  conv = functools.partial(
    layers.Conv,
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    dot_1x1=m.conv1x1_impl == "dot",
    weight_grad=resolve_weight_grad(m.conv_weight_grad),
  )
  if m.norm == "batch":
    bn = layers.BatchNorm if resolve_batch_norm(m.batch_norm_impl) == "fused" else nn.BatchNorm
    norm = functools.partial(
      bn, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
    )
  else:
    norm = functools.partial(nn.GroupNorm, num_groups=m.group_norm_groups, dtype=dtype)
  residual = remat(ResidualBlock, m)
  return conv, norm, residual


def remat(block: type[nn.Module], m: Any) -> type[nn.Module]:
  """`block` rematerialised with the model's `remat_policy` when `m.remat`, else itself."""
  return nn.remat(block, policy=REMAT_POLICIES[m.remat_policy]) if m.remat else block


def down_path(m: Any, x: jax.Array, conv, norm, residual, perturb=None) -> list[jax.Array]:
  """The stem and down path (Sec 3.1); call inside a compact method. Submodules are named
  stem, stem_norm, down<l>, res<l>_<b>; `perturb` (a module's `self.perturb`) wraps each
  level's output as 'level<l>' (Grad-CAM, `lsemil.models.posthoc`). Returns the levels, fine
  to coarse."""
  transform = "none" if m.stem_impl == "conv" else m.stem_impl
  stem = conv(
    m.stem_features, (7, 7), strides=m.stem_stride, input_transform=transform, name="stem"
  )
  h = nn.relu(norm(name="stem_norm")(stem(x)))
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


class Backbone(nn.Module):
  """The fields of the stem and down path (Sec 3.1): what the MIL model and the GAP baseline
  (`lsemil.models.gap_classifier`) share. Their values are in configs/paper.py."""

  num_classes: int
  input_size: int
  stem_stride: int
  stem_features: int
  widths: Sequence[int]
  blocks_per_level: Sequence[int]
  bottleneck_ratio: int
  norm: str
  group_norm_groups: int
  dtype: str
  remat: bool
  batch_norm_impl: str
  conv1x1_impl: str
  conv_weight_grad: str
  stem_impl: str
  remat_policy: str


class MultiResolutionMIL(Backbone):
  """Multi-resolution MIL network with LSE-LBA pooling (Sec 3, Fig. 2).

  Build from a config with `from_config(cfg.model)`; the fields, and their values for the
  paper, are in configs/paper.py (the only place they are written). Beyond the `Backbone`:
  the horizontal flow (Sec 3.2), the up path (Sec 3.3) and the MIL pooling (Sec 3.4-3.5).
  """

  dense_layers: int
  dense_growth: int
  up_features: int
  up_convs: int
  saliency_size: int
  pooling: str
  r0: float
  per_class_beta: bool
  beta_init: float
  dense_impl: str
  up_impl: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, Any]:
    spec = validate(self)
    if x.ndim != 4 or x.shape[1:] != (self.input_size, self.input_size, 1):
      raise ValueError(
        f"expected images shaped (B, {self.input_size}, {self.input_size}, 1), got {x.shape}"
      )
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) * (1.0 / 255.0)
    conv, norm, residual = layer_fns(self, train)
    dense = remat(DenseBlock, self)
    levels = down_path(self, x.astype(DTYPES[self.dtype]), conv, norm, residual)

    # Horizontal flow (Sec 3.2) on the fused levels, then the up path (Sec 3.3).
    refined = {
      level: dense(
        self.dense_layers,
        self.dense_growth,
        conv,
        norm,
        resolve_concat_impl(self.dense_impl),
        name=f"dense{level}",
      )(levels[level])
      for level in spec.fused_levels
    }
    head = conv(self.num_classes, (1, 1), use_bias=True, name="head")  # shared W (Sec 3.6)
    coarse_to_fine = spec.fused_levels[::-1]
    # A 1x1 projection gives the coarsest level the width of the up path, so the one
    # shared head W reads every level's fused features (for `saliency_levels`).
    fused = conv(self.up_features, (1, 1), name=f"up{coarse_to_fine[0]}_in")(
      refined[coarse_to_fine[0]]
    )
    fused = nn.relu(norm(name=f"up{coarse_to_fine[0]}_in_norm")(fused))
    level_logits = [head(fused)]
    for level in coarse_to_fine[1:]:
      impl = resolve_concat_impl(self.up_impl)
      up = FuseUp(self.up_features, self.up_convs, conv, norm, impl, name=f"up{level}")
      fused = up(fused, refined[level])
      level_logits.append(head(fused))

    # Sigmoid saliency (Sec 3.6) and MIL pooling (Sec 3.4/3.5), in float32.
    saliency_levels = tuple(nn.sigmoid(z.astype(jnp.float32)) for z in level_logits)
    saliency = saliency_levels[-1]
    if self.pooling == "lse_lba":
      pool = pooling.LSELBAPool(
        self.r0, per_class_beta=self.per_class_beta, beta_init=self.beta_init, name="pool"
      )
    else:
      pool = pooling.FixedPool(self.pooling, r=float(self.r0), name="pool")
    return {"probs": pool(saliency), "saliency": saliency, "saliency_levels": saliency_levels}


def resolve_batch_norm(choice: str, platform: str | None = None) -> str:
  """'auto' -> 'flax' on CPU backends (faster there in float32, measured), else 'fused'.

  `platform`: the backend the program is compiled for; default `jax.default_backend()`
  (a TPU program compiled ahead of time on a CPU host passes 'tpu')."""
  if choice != "auto":
    return choice
  return "flax" if (platform or jax.default_backend()) == "cpu" else "fused"


def resolve_weight_grad(choice: str, platform: str | None = None) -> str:
  """'auto' -> 'gemm' on CPU backends (where it measured faster), else 'xla'; `platform`
  as in `resolve_batch_norm`."""
  if choice != "auto":
    return choice
  return "gemm" if (platform or jax.default_backend()) == "cpu" else "xla"


def resolve_concat_impl(choice: str, platform: str | None = None) -> str:
  """`dense_impl` / `up_impl` 'auto' -> 'split' on TPU (fewer bytes per step, measured with
  `lsemil aot`, README), else 'concat' (the CPU program stays what it was, bit for bit);
  `platform` as in `resolve_batch_norm`."""
  if choice != "auto":
    return choice
  return "split" if (platform or jax.default_backend()) == "tpu" else "concat"


def fields_from_config(cls: type[Backbone], cfg: Any, what: str) -> dict[str, Any]:
  """The constructor arguments of `cls` from a model config (a ConfigDict or a mapping):
  every field given, none unknown (`arch` aside); ConfigError naming them otherwise."""
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "arch"}
  values = {k: cfg[k] for k in cfg.keys() if k != "arch"}
  unknown, missing = set(values) - fields, fields - set(values)
  if unknown:
    raise ConfigError(f"{what}: unknown fields {sorted(unknown)}")
  if missing:
    raise ConfigError(f"{what}: missing fields {sorted(missing)} (see configs/paper.py)")
  for key in ("widths", "blocks_per_level"):
    values[key] = tuple(int(v) for v in values[key])
  return values


def from_config(cfg: Any) -> MultiResolutionMIL:
  """Builds the model from `config.model` (a ConfigDict or a mapping of the fields)."""
  if cfg.get("arch", "mil") != "mil":
    raise ConfigError("model config: arch is not 'mil'; build it with lsemil.models.registry")
  model = MultiResolutionMIL(**fields_from_config(MultiResolutionMIL, cfg, "model config"))
  validate(model)
  return model


def init_variables(model: MultiResolutionMIL, rng: jax.Array, batch_size: int = 1) -> dict:
  """`model.init` on a zero batch (train=False), jitted; returns {'params', 'batch_stats'?}."""
  x = jnp.zeros((batch_size, model.input_size, model.input_size, 1), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))({"params": rng}, x)


def param_count(params: Any) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def forward_flops(model: MultiResolutionMIL, batch_size: int = 1) -> float:
  """Forward FLOPs per image from XLA's cost analysis of the lowered eval forward."""
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
  x = jax.ShapeDtypeStruct((batch_size, model.input_size, model.input_size, 1), jnp.float32)
  fn = jax.jit(functools.partial(model.apply, train=False))
  # The lowered (pre-compilation) program: after GPU compilation convolutions become cuDNN
  # custom calls that XLA's cost analysis counts as 0 FLOPs.
  cost = fn.lower(variables, x).cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) / batch_size
