"""The weakly supervised MIL cost (Sec 3.6) and the paper's optimizer (Sec 4.2).

The pooled outputs are probabilities, not logits: LSE-LBA maps S in [0, 1] to [0, 1]
(Sec 3.5), so the cost is the multi-label binary cross-entropy of those probabilities
against the image-level labels, summed over the K classes and averaged over images.
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
