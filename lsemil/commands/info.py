"""`lsemil info`: versions, devices, and the size of a configured model."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

PACKAGES = (
  "lsemil",
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "tensorflow-datasets",
  "numpy",
  "chex",
  "ml_collections",
)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="lsemil info", description="Print versions, devices and a model's size."
  )
  parser.add_argument(
    "--config",
    default="paper",
    help="config file or name with optional :arg, e.g. configs/paper.py:r0=5 or paper:r0=5 "
    "(default: paper)",
  )
  args = parser.parse_args(argv)

  from lsemil.core import configuration

  config = configuration.load_config(args.config)  # a bad config fails before any output
  configuration.check_finite(config)

  import jax

  from lsemil.models import mil, registry

  print(f"python   {platform.python_version()} ({platform.machine()})")
  for name in PACKAGES:
    try:
      version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      version = "not installed"
    print(f"{name:<20} {version}")
  try:
    importlib.metadata.version("tensorflow")
    print("WARNING: tensorflow is installed; lsemil does not need it")
  except importlib.metadata.PackageNotFoundError:
    pass
  print(f"backend  {jax.default_backend()}; {jax.process_count()} process(es)")
  for device in jax.devices():
    print(f"  {device.id}: {device.device_kind} ({device.platform})")

  model = registry.from_config(config.model)
  spec = registry.validate(config.model)
  variables = jax.eval_shape(lambda: mil.init_variables(model, jax.random.key(0)))
  params = mil.param_count(variables["params"])
  gflops = mil.forward_flops(model) / 1e9
  m = config.model
  if registry.arch_of(model) == registry.MIL:
    head = f"saliency {m.saliency_size}x{m.saliency_size}, levels {spec.level_sides}, "
    head += f"pooling {m.pooling} (r0={m.r0})"
  else:
    head = f"levels {spec.level_sides}, global average pooling (the GAP baseline)"
  print(f"config   {args.config} ({config.name}): input {m.input_size}x{m.input_size}, {head}")
  print(f"params   {params:,}")
  print(f"forward  {gflops:.4g} GFLOPs/image (XLA cost analysis)")
  return 0
