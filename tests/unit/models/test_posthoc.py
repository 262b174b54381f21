"""lsemil.models.posthoc and lsemil.models.gap_classifier: CAM and Grad-CAM against direct
computations on a tiny GAP model, the forward contract, the trainer's call, the config, and
the model-free sources."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsemil.core import configuration
from lsemil.core.errors import ConfigError
from lsemil.metrics import baselines, localization, overlap
from lsemil.models import gap_classifier, mil, posthoc

# Cheaper XLA CPU compiles for this module (flax's example tests do the same).
pytestmark = pytest.mark.usefixtures("fast_compiles")

# The demo-size GAP config (every field from configs/), shrunk.
TINY = {
  **configuration.load_config("baseline_gap:size=demo").model.to_dict(),
  "num_classes": 3,
  "input_size": 32,
  "stem_stride": 2,
  "stem_features": 4,
  "widths": (4, 8, 8),
  "blocks_per_level": (0, 1, 1),
  "bottleneck_ratio": 2,
  "arch": "gap",
}  # level sides 16, 8, 4


def jit_apply(model):
  return jax.jit(functools.partial(model.apply, train=False))


def jit_gradcam(model, level):
  return jax.jit(lambda v, x: posthoc.gradcam_raw(model, v, x, level)[0])


@pytest.fixture(scope="module")
def tiny(random_variables):
  model = gap_classifier.from_config(TINY)
  v = random_variables(model, seed=1)
  variables = {"params": v["params"], "batch_stats": v["batch_stats"]}
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype(np.uint8)
  return model, variables, images


def np_minmax(m: np.ndarray) -> np.ndarray:
  """Per (image, class) min-max over the spatial axes of (B, h, w, K)."""
  lo = m.min(axis=(1, 2), keepdims=True)
  span = m.max(axis=(1, 2), keepdims=True) - lo
  return np.where(span > 0, (m - lo) / np.where(span > 0, span, 1), 0.0)


def test_outputs_and_linear_head(tiny):
  model, variables, images = tiny
  out = jit_apply(model)(variables, images)
  f = np.asarray(out["features"], np.float64)
  assert f.shape == (2, 4, 4, 8) and [x.shape[1] for x in out["levels"]] == [16, 8, 4]
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["head"]["bias"], np.float64)
  logits = f.mean(axis=(1, 2)) @ w + b  # global average pooling, then the linear head
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["probs"], 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)


def test_cam_is_the_heads_weighted_sum_of_features(tiny):
  model, variables, images = tiny
  out = jit_apply(model)(variables, images)
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  want = np_minmax(np.einsum("bhwc,ck->bhwk", np.asarray(out["features"], np.float64), w))
  got = np.asarray(posthoc.saliency_fn(model, variables, images, source="cam"))
  assert got.shape == (2, 4, 4, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert got.min() == 0.0 and got.max() == pytest.approx(1.0)


def test_gradcam_at_the_coarsest_level_is_relu_cam(tiny):
  # d y_k / d F = W[:, k] / (h w) at the pooled level: Grad-CAM = relu(CAM) / (h w).
  model, variables, images = tiny
  out = jit_apply(model)(variables, images)
  w = np.asarray(variables["params"]["head"]["kernel"], np.float64)
  raw = np.einsum("bhwc,ck->bhwk", np.asarray(out["features"], np.float64), w) / 16
  got_raw = jit_gradcam(model, -1)(variables, images)
  np.testing.assert_allclose(got_raw, np.maximum(raw, 0), rtol=1e-4, atol=1e-6)
  got = np.asarray(posthoc.saliency_fn(model, variables, images, source="gradcam", level=2))
  np.testing.assert_allclose(got, np_minmax(np.maximum(raw, 0)), atol=1e-4)


def test_gradcam_at_an_inner_level_equals_a_direct_computation(tiny):
  # alpha_{k,c} = mean_ij d y_k / d F_ijc, from the Jacobian of one image's logits with
  # respect to the level's features (jax.jacrev through the perturbation hook), checked
  # against central differences along each channel's all-ones direction (eps small enough
  # to cross no ReLU kink of this model; float32 round-off ~1e-3 of max |alpha|).
  model, variables, images = tiny
  level, eps = 1, 1e-4
  feats = np.asarray(jit_apply(model)(variables, images[:1])["levels"][level])[0]
  h, w, c = feats.shape
  sides = gap_classifier.level_sides(model)

  def logits_of(delta):
    pert = {
      f"level{lv}": jnp.zeros((delta.shape[0], s, s, model.widths[lv]))
      for lv, s in enumerate(sides)
    }
    pert[f"level{level}"] = delta
    x = jnp.repeat(jnp.asarray(images[:1]), delta.shape[0], axis=0)
    return model.apply({**variables, "perturbations": pert}, x, train=False)["logits"]

  jac = jax.jit(jax.jacrev(lambda d: logits_of(d)[0]))(jnp.zeros((1, h, w, c)))  # (K, 1, h, w, C)
  alpha = np.asarray(jac, np.float64).mean(axis=(1, 2, 3)).T  # (C, K)
  delta = np.zeros((2 * c, h, w, c), np.float32)
  for ch in range(c):
    delta[2 * ch, ..., ch], delta[2 * ch + 1, ..., ch] = eps, -eps
  y = np.asarray(jax.jit(logits_of)(delta), np.float64)
  fd = (y[0::2] - y[1::2]) / (2 * eps) / (h * w)
  np.testing.assert_allclose(fd, alpha, atol=2e-3 * np.abs(alpha).max())
  direct = np.maximum(np.einsum("hwc,ck->hwk", feats.astype(np.float64), alpha), 0)[None]
  got_raw = jit_gradcam(model, level)(variables, images[:1])
  np.testing.assert_allclose(got_raw, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
  got = posthoc.saliency_fn(model, variables, images[:1], source="gradcam", level=level)
  assert got.shape == (1, 8, 8, 3)
  np.testing.assert_allclose(got, np_minmax(direct), atol=1e-4)


def test_forward_contract_and_predict_fn(tiny):
  model, variables, images = tiny
  shapes = lambda **kw: jax.eval_shape(
    functools.partial(posthoc.forward, model=model, **kw), variables, images
  )  # noqa: E731
  out = shapes(source="gradcam", levels=True)
  assert set(out) == {"probs", "saliency", "saliency_levels"}
  assert out["saliency"].shape == (2, 4, 4, 3) and out["saliency_levels"][0].shape == (2, 4, 4, 3)
  assert set(shapes(source="gradcam", level=0)) == {"probs", "saliency"}
  assert shapes(source="gradcam", level=0)["saliency"].shape == (2, 16, 16, 3)
  assert set(shapes(saliency=False)) == {"probs"}
  pred = posthoc.make_predict_fn(model, "cam")(variables, images)
  np.testing.assert_allclose(pred["probs"], jit_apply(model)(variables, images)["probs"])
  assert float(pred["saliency"].min()) >= 0 and float(pred["saliency"].max()) <= 1
  with pytest.raises(ValueError, match="source"):
    shapes(source="lime")


def test_the_trainers_apply_trains_it(tiny):
  # The trainer calls model.apply(..., train=True, mutable=['batch_stats']) and reads 'probs'.
  model, variables, images = tiny
  labels = jnp.asarray(np.eye(3)[[0, 2]], jnp.float32)

  def loss(params):
    out, upd = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      images,
      train=True,
      mutable=["batch_stats"],
    )
    p = jnp.clip(out["probs"], 1e-6, 1 - 1e-6)
    return -jnp.mean(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p)), upd

  (value, upd), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert np.isfinite(float(value)) and set(upd) == {"batch_stats"}
  assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["stem"]["kernel"]).sum()) > 0
  assert model.pooling == "gap"  # train's LSE-LBA sharpness metric is skipped


def test_same_down_path_parameters_as_the_mil_model():
  mil_cfg = configuration.load_config("demo").model
  gap = gap_classifier.from_config(
    configuration.load_config("configs/baseline_gap.py:size=demo").model
  )
  mil_model = mil.from_config(mil_cfg)
  shapes = lambda m: jax.eval_shape(lambda: mil.init_variables(m, jax.random.key(0)))  # noqa: E731
  p_gap, p_mil = shapes(gap)["params"], shapes(mil_model)["params"]
  down = [k for k in p_gap if k != "head"]
  assert down == [k for k in p_mil if k.startswith(("stem", "down", "res"))]
  for k in down:
    assert jax.tree.map(lambda x: x.shape, p_gap[k]) == jax.tree.map(lambda x: x.shape, p_mil[k])
  assert p_gap["head"]["kernel"].shape == (mil_cfg.widths[-1], 14)


def test_config_variants_and_errors():
  paper = configuration.load_config("configs/baseline_gap.py:size=paper")
  demo = configuration.load_config("configs/baseline_gap.py", "size=demo")
  assert paper.model.arch == demo.model.arch == "gap"
  assert paper.model.input_size == 512 and demo.model.input_size == 128
  assert demo.train.to_dict() == configuration.load_config("demo").train.to_dict()
  assert "saliency_size" not in demo.model and demo.saliency.source == "gradcam"
  with pytest.raises(ConfigError, match="size"):
    configuration.load_config("configs/baseline_gap.py:size=huge")
  with pytest.raises(ConfigError, match="unknown fields"):
    gap_classifier.from_config({**TINY, "saliency_size": 8})
  with pytest.raises(ConfigError, match="arch"):
    gap_classifier.from_config({**TINY, "arch": "mil"})
  with pytest.raises(ConfigError, match="input_size"):
    gap_classifier.from_config({**TINY, "input_size": 48})


def test_centre_prior_orientation():
  m = baselines.centre_prior(50)
  r, c = np.unravel_index(np.argmax(m), m.shape)
  assert (r, c) == (22, 24) or (r, c) == (22, 25)  # rows are y (0.46), columns x (0.5)
  assert 0 < m.min() and m.max() <= 1
  assert m[22, 0] > m[0, 25]  # wider than tall: sx 0.2 > sy 0.18, and off-centre in y


def test_constant_maps_are_the_uniform_dice_oracle():
  boxes = ((10.0, 4.0, 8.0, 6.0),)
  cases = [localization.Case(0, 1, boxes, 1), localization.Case(1, 1, boxes, 2)]
  maps = baselines.constant_maps(cases, 32, size=16)
  g = overlap.boxes_to_mask(boxes, 16, 32)
  assert maps[(0, 1)][0, 0] == pytest.approx(np.sqrt(12 / 256))
  res = localization.score_all(cases, maps, 32, size=16, n_boot=0, class_names=["A", "B"])
  assert res["dice"]["B"]["value"] == pytest.approx(overlap.uniform_dice(g))
  assert res["dice"]["B"]["value"] == pytest.approx(res["dice"]["B"]["constant"])
  assert res["hit_rate_expected"]["B"]["value"] == pytest.approx(12 / 256)  # ties everywhere
  centre = baselines.centre_prior_maps(cases, 8)
  assert set(centre) == {(0, 1), (1, 1)} and centre[(0, 1)].shape == (8, 8)
