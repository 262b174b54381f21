"""Benchmark: model.onnx of `lsemil export` against JAX at the demo and paper sizes.

  python benchmarks/onnx_parity.py [--configs smoke,demo,paper] [--batch 2] [--workdir W]

For each config: a model with random weights (kernels ~ N(0, 2 / fan_in), norm scales 1,
running variances drawn around 1, biases small; no init compile) or, with --workdir, the
run's best checkpoint; converted by `lsemil.inference.onnx_graph.convert` (what `lsemil export`
writes), run in onnxruntime (CPU) on `--batch` phantom chest images and by the one JAX
prediction path (`engine.Predictor`). Prints a Markdown table: conversion seconds, the graph's
size, the largest absolute difference of the probabilities and of the saliency maps, and the
seconds per image of each runtime (the second call, after compilation / session start).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import numpy as np


def random_weights(model, seed: int = 0) -> dict:
  """{'params', 'batch_stats'?} of `model`'s shapes, drawn on the host."""
  from lsemil.models import mil

  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: mil.init_variables(model, jax.random.key(0)))

  def draw(path, leaf):
    leaf_name = jax.tree_util.keystr(path[-1:])
    if "kernel" in leaf_name:
      std = math.sqrt(2.0 / max(1, int(np.prod(leaf.shape[:-1]))))
      return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)
    if "scale" in leaf_name:
      return np.ones(leaf.shape, leaf.dtype)
    if "var" in leaf_name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    return rng.normal(0.0, 0.01, leaf.shape).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def chest_images(n: int, size: int) -> np.ndarray:
  """n smooth chest-like uint8 (size, size, 1) images with texture (no dataset needed)."""
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for i in range(n):
    lungs = np.exp(-((xx - 0.5) ** 2 + (yy - 0.45 - 0.02 * i) ** 2) / 0.08)
    img = 50 + 150 * lungs + rng.normal(0, 12, (size, size))
    out.append(np.clip(img, 0, 255).astype(np.uint8)[:, :, None])
  return np.stack(out)


def measure(name: str, batch: int, workdir: str | None) -> dict:
  from lsemil.core import configuration
  from lsemil.inference import engine, onnx_graph
  from lsemil.models import registry

  if workdir:
    loaded = engine.load(workdir)
  else:
    config = configuration.load_config(name)
    model = registry.from_config(config.model)
    loaded = engine.LoadedModel(config, model, random_weights(model), 0, f"random {name}", {})
  start = time.perf_counter()
  data = onnx_graph.convert(loaded)
  convert_s = time.perf_counter() - start
  sess = onnx_graph.session(data)
  images = chest_images(batch, int(loaded.model.input_size))
  predictor = engine.Predictor(loaded.model, loaded.variables)
  timings = {}
  for runtime, fn in (
    ("jax", lambda: predictor.predict_images(images, batch, saliency=True)),
    ("onnx", lambda: onnx_graph.run(sess, images)),
  ):
    fn()  # compile / warm up
    start = time.perf_counter()
    timings[runtime] = (fn(), (time.perf_counter() - start) / batch)
  want, got = timings["jax"][0], timings["onnx"][0]
  return {
    "config": f"{loaded.config.name}, step {loaded.step}" if workdir else f"{name}, random",
    "input": int(loaded.model.input_size),
    "maps": int(loaded.model.saliency_size),
    "convert_s": convert_s,
    "onnx_mb": len(data) / 2**20,
    "probs": float(np.abs(got["probs"] - want["probs"]).max()),
    "saliency": float(np.abs(got["saliency"] - want["saliency"]).max()),
    "prob_range": (float(want["probs"].min()), float(want["probs"].max())),
    "jax_s": timings["jax"][1],
    "onnx_s": timings["onnx"][1],
  }


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="demo,paper", help="named configs (default demo,paper)")
  p.add_argument("--batch", type=int, default=2, help="images per batch (default 2)")
  p.add_argument("--workdir", help="a trained run instead of random weights (one config)")
  args = p.parse_args(argv)
  rows = [measure(c, args.batch, args.workdir) for c in args.configs.split(",")]
  print(
    "| config | input | map | convert s | model.onnx MB | max abs diff probs | "
    "max abs diff maps | probs range | JAX s/img | onnxruntime s/img |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
  for r in rows:
    lo, hi = r["prob_range"]
    print(
      f"| {r['config']} | {r['input']} | {r['maps']} | {r['convert_s']:.1f} | "
      f"{r['onnx_mb']:.1f} | {r['probs']:.1e} | {r['saliency']:.1e} | {lo:.3f}-{hi:.3f} | "
      f"{r['jax_s']:.3f} | {r['onnx_s']:.3f} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
