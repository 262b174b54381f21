"""The weakly supervised MIL cost (Sec 3.6) and the paper's optimizer (Sec 4.2).

The pooled outputs are probabilities, not logits: LSE-LBA maps S in [0, 1] to [0, 1]
(Sec 3.5), so the cost is the multi-label binary cross-entropy of those probabilities
against the image-level labels, summed over the K classes and averaged over images.

Sources with unknown labels (NaN: CheXpert's uncertain or blank under the `ignore` policies)
use `masked_binary_cross_entropy`: each class's BCE is averaged over the images where that
class is known, and the classes are summed, as TorchXRayVision trains (its `train_utils`:
per task, the criterion over the non-NaN targets; the task losses summed). Without unknown
labels it equals the paper's cost up to float rounding; NIH keeps `binary_cross_entropy`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Probabilities are clipped to [eps, 1 - eps] before the logs. In float32, 1 - 1e-7 is
# representable (spacing near 1 is 6e-8), so log(1 - p) stays finite for p -> 1.
PROB_EPS = 1e-7


def binary_cross_entropy(
  probs: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Multi-label BCE on probabilities (Sec 3.6), computed in float32.

  Args:
    probs: `(B, K)` pooled class probabilities in [0, 1].
    labels: `(B, K)` binary image-level labels.
    mask: optional `(B,)` validity weights (padding in eval batches gets 0).

  Returns:
    The scalar mean over valid images of sum_k -[y log p + (1 - y) log(1 - p)].
  """
  p = jnp.clip(probs.astype(jnp.float32), PROB_EPS, 1.0 - PROB_EPS)
  y = labels.astype(jnp.float32)
  per_image = -jnp.sum(y * jnp.log(p) + (1.0 - y) * jnp.log1p(-p), axis=-1)
  if mask is None:
    return jnp.mean(per_image)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_image * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_binary_cross_entropy(
  probs: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """The BCE over known labels only, in float32: sum_k mean_{i: y_ik known} bce(p_ik, y_ik).

  Args:
    probs: `(B, K)` pooled class probabilities in [0, 1].
    labels: `(B, K)` labels 1 / 0, NaN where unknown.
    mask: optional `(B,)` validity weights (padding in eval batches gets 0).

  A class with no known label in the batch adds 0, and so does an image with none. The
  unknown entries are replaced before the logs, so their gradient is exactly 0 (not NaN).
  """
  p = jnp.clip(probs.astype(jnp.float32), PROB_EPS, 1.0 - PROB_EPS)
  y = labels.astype(jnp.float32)
  known = ~jnp.isnan(y)
  if mask is not None:
    known = known & (mask.astype(jnp.float32)[:, None] > 0)
  y = jnp.where(known, y, 0.0)
  per_entry = -(y * jnp.log(p) + (1.0 - y) * jnp.log1p(-p))
  counts = jnp.sum(known, axis=0).astype(jnp.float32)
  per_class = jnp.sum(jnp.where(known, per_entry, 0.0), axis=0) / jnp.maximum(counts, 1.0)
  return jnp.sum(per_class)


def paper_optimizer(
  learning_rate: float = 1e-3, weight_decay: float = 1e-5
) -> optax.GradientTransformation:
  """Adam with L2 weight decay (Sec 4.2: Adam, lr 1e-3, weight decay 1e-5).

  The decay is *coupled*, as an L2 penalty would be (the paper's "weight decay" in a
  2018 Keras/PyTorch Adam): `optax.add_decayed_weights` adds wd * w to the gradient
  before Adam's moment estimates, unlike AdamW's decoupled decay. It applies to every
  parameter, including norm scales and LSE-LBA's beta, as Adam's weight_decay does.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(learning_rate),
  )
