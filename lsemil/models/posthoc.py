"""Post-hoc saliency maps (CAM, Grad-CAM) of the GAP baseline, to compare with the MIL map S.

For the GAP baseline (`lsemil.models.gap_classifier`, the single-resolution post-hoc design the
paper argues against in Sec 2.2 and 2.3); scored by `lsemil.metrics.localization`:

- CAM (Zhou et al. 2016): M_k = sum_c W[c, k] F_c, F the coarsest level's features and W the
  linear head's kernel (the class score is the spatial mean of M_k plus the bias).
- Grad-CAM (Selvaraju et al. 2017) at a chosen level l: alpha_{k,c} = mean_{i,j} d y_k /
  d F^l_{i,j,c} (y_k the class logit, the gradient taken with jax over the level's
  `perturb` hook) and M_k = relu(sum_c alpha_{k,c} F^l_c). At the coarsest level
  d y_k / d F = W[:, k] / (h w), so Grad-CAM there is relu(CAM) up to a positive factor.

Scaling choice: every map is min-max scaled to [0, 1] per image and class,
(M - min M) / (max M - min M), a constant map becoming 0. CAM and Grad-CAM have no absolute
scale (a logit's linear share), while the MIL map S is a probability in [0, 1]; DICE and the
energy game depend on the scale, so the post-hoc maps get the common convention of the
Grad-CAM and cheXlocalize code (the best case for them on DICE: the peak reaches 1).

The model-free maps (the constant map, the centre prior) are `lsemil.metrics.baselines`.

`forward` has the contract of `lsemil.inference.engine`'s model forward (probs, and saliency /
saliency_levels when asked), so a GAP checkpoint runs through the one prediction path with
`functools.partial(posthoc.forward, model=..., source=..., level=...)`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lsemil.models import gap_classifier, mil

SOURCES = ("gradcam", "cam")


def minmax_maps(m: jax.Array) -> jax.Array:
  """(B, h, w, K) -> each (image, class) map min-max scaled to [0, 1]; constant maps -> 0."""
  lo = jnp.min(m, axis=(1, 2), keepdims=True)
  hi = jnp.max(m, axis=(1, 2), keepdims=True)
  span = hi - lo
  return jnp.where(span > 0, (m - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def cam_raw(features: jax.Array, kernel: jax.Array) -> jax.Array:
  """CAM before scaling: sum_c W[c, k] F[..., c]; features (B, h, w, C), kernel (C, K)."""
  return jnp.einsum("bhwc,ck->bhwk", features.astype(jnp.float32), kernel.astype(jnp.float32))


def _zero_perturbations(model, batch: int) -> dict:
  sides = gap_classifier.level_sides(model)
  dtype = mil.DTYPES[model.dtype]
  return {
    f"level{lv}": jnp.zeros((batch, s, s, int(w)), dtype)
    for lv, (s, w) in enumerate(zip(sides, model.widths, strict=True))
  }


def gradcam_raw(model, variables, images, level: int = -1) -> tuple[jax.Array, dict]:
  """Grad-CAM before scaling at `level` (an index into the levels): ((B, h_l, w_l, K), out).

  One forward, then one backward per class (vmapped over the K one-hot cotangents of the
  logits) down to the level's perturbation only. Images are independent in eval mode, so the
  gradient of the batch's summed class logit w.r.t. image b's features is d y_{b,k} / d F_b.
  """
  level = range(len(model.widths))[level]
  base = {k: v for k, v in variables.items() if k != "perturbations"}

  def logits_of(pert):
    out = model.apply({**base, "perturbations": pert}, images, train=False)
    return out["logits"], out

  logits, vjp, out = jax.vjp(logits_of, _zero_perturbations(model, images.shape[0]), has_aux=True)
  k = logits.shape[-1]
  cotangents = jnp.broadcast_to(jnp.eye(k, dtype=logits.dtype)[:, None, :], (k, *logits.shape))
  grads = jax.vmap(lambda ct: vjp(ct)[0][f"level{level}"])(cotangents)  # (K, B, h, w, C)
  alpha = jnp.mean(grads.astype(jnp.float32), axis=(2, 3))  # (K, B, C)
  feats = out["levels"][level].astype(jnp.float32)
  return jax.nn.relu(jnp.einsum("bhwc,kbc->bhwk", feats, alpha)), out


def forward(
  variables,
  images,
  *,
  model,
  source: str = "gradcam",
  level: int = -1,
  saliency: bool = True,
  levels: bool = False,
) -> dict[str, Any]:
  """The GAP model's forward with a post-hoc saliency map (min-max scaled per image and class).

  Returns {'probs': (B, K), 'saliency': (B, h, w, K) when `saliency` or `levels`,
  'saliency_levels': (saliency,) when `levels`}: the contract of the MIL model's output, so
  evaluation code that keeps out['saliency'] takes either model.
  """
  if source not in SOURCES:
    raise ValueError(f"saliency source must be one of {SOURCES}, got {source!r}")
  if not (saliency or levels):
    return {"probs": model.apply(variables, images, train=False)["probs"]}
  if source == "gradcam":
    raw, out = gradcam_raw(model, variables, images, level)
  else:
    out = model.apply(variables, images, train=False)
    raw = cam_raw(out["features"], variables["params"]["head"]["kernel"])
  s = minmax_maps(raw)
  result = {"probs": out["probs"], "saliency": s}
  if levels:
    result["saliency_levels"] = (s,)
  return result


def make_predict_fn(model, source: str = "gradcam", level: int = -1):
  """jitted fn(variables, images) -> {'probs', 'saliency', 'saliency_levels'}: the drop-in for
  `train.make_predict_fn(model)` with a GAP model."""
  return jax.jit(functools.partial(forward, model=model, source=source, level=level, levels=True))


@functools.lru_cache(maxsize=16)
def make_saliency_fn(model, source: str = "gradcam", level: int = -1):
  """jitted fn(variables, images) -> (B, h, w, K) maps in [0, 1] (compiled once per model)."""

  def fn(variables, images):
    return forward(variables, images, model=model, source=source, level=level)["saliency"]

  return jax.jit(fn)


def saliency_fn(model, variables, images, *, source: str = "gradcam", level: int = -1):
  """(B, h, w, K) Grad-CAM or CAM maps in [0, 1], jitted (`make_saliency_fn`)."""
  return make_saliency_fn(model, source, level)(variables, images)


# ----------------------------------------------------------------------------------------------
# Model-free sources (numpy)


