"""The train and eval steps compiled for a TPU topology on any host (`lsemil aot`).

Know before you rent: MaxText's `train_compile.py` pattern applied to lsemil's own steps.
`compile_steps` builds the mesh `lsemil train` would build on the slice
(`sharding.create_mesh` over the topology's devices, one per chip), the same state
shardings (replicated, or FSDP with `config.train.fsdp`), lowers the real
`trainer.make_train_step` and the inference path's forward (`engine.jitted_forward`, what
validation, evaluate and predict run) with sharded `jax.ShapeDtypeStruct`s, and compiles
both for the TPU. `report` turns the executables into plain data:

- HBM per device from `memory_analysis()`: arguments, outputs, aliased (the donated state),
  temporaries, generated code; total = arguments + outputs - aliased + temporaries + code,
  against the chip's capacity (`accelerators.CHIPS`): fits, headroom;
- flops and bytes accessed per device and step from `cost_analysis()`, the roofline step
  time against the chip's published peaks, the bound, images/s per chip and per slice, and
  hours per epoch of NIH's 86,524 training images (compile-time estimates: input pipeline,
  collectives' latency and step overheads are not in them);
- the collectives of the compiled HLO (count, bytes), so a multi-host topology shows what
  crosses hosts;
- the sharding of the input batch and of every parameter group;
- the parts of the model that move the most bytes (`accelerators.traffic`).

The model's `auto` options follow `jax.default_backend()`, the CPU on such a host:
`for_platform` resolves them for the target first. `largest_batch` bisects over compiles.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lsemil.core.errors import ConfigError
from lsemil.inference import engine
from lsemil.models import mil, registry
from lsemil.runtime import accelerators, sharding
from lsemil.training import trainer

NIH_TRAIN_IMAGES = 86_524  # NIH ChestX-ray14's official train_val list (Wang et al. 2017)


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """A copy of `config` with the model's `auto` speed options resolved for `platform`
  (not for this host's backend): what `lsemil train` resolves on that platform."""
  config = ml_collections.ConfigDict(config.to_dict())
  m = config.model
  if "batch_norm_impl" in m:
    m.batch_norm_impl = mil.resolve_batch_norm(m.batch_norm_impl, platform)
  if "conv_weight_grad" in m:
    m.conv_weight_grad = mil.resolve_weight_grad(m.conv_weight_grad, platform)
  for key in ("dense_impl", "up_impl"):
    if key in m:
      m[key] = mil.resolve_concat_impl(m[key], platform)
  return config


@dataclasses.dataclass
class Compiled:
  """The two compiled steps of one config, topology and per-chip batch."""

  config: ml_collections.ConfigDict  # resolved for the platform, batch sizes set
  chip: accelerators.Chip
  devices: list[Any]
  mesh: jax.sharding.Mesh
  per_chip_batch: int
  eval_per_chip_batch: int
  train: Any  # jax.stages.Compiled
  eval: Any
  train_seconds: float
  eval_seconds: float
  batch_sharding: jax.NamedSharding
  state_sharding: Any
  abstract_state: Any


def _sds(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )


def _batch(config, global_batch: int, batch_sh) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch as the input pipeline delivers it: uint8 images, float32 labels."""
  side, classes = int(config.model.input_size), int(config.model.num_classes)
  return {
    "image": jax.ShapeDtypeStruct((global_batch, side, side, 1), jnp.uint8, sharding=batch_sh),
    "labels": jax.ShapeDtypeStruct((global_batch, classes), jnp.float32, sharding=batch_sh),
  }


def compile_steps(
  config: ml_collections.ConfigDict,
  devices: Sequence[Any],
  chip: accelerators.Chip,
  per_chip_batch: int,
  *,
  with_eval: bool = True,
) -> Compiled:
  """Lowers and compiles the train step (and the eval forward) for `devices`.

  The global batch is `per_chip_batch` x the devices; validation's per-chip batch keeps the
  config's eval / train batch ratio (at least 1x).
  """
  if per_chip_batch < 1:
    raise ConfigError(f"--per-chip-batch must be >= 1, got {per_chip_batch}")
  devices = list(devices)
  n = len(devices)
  config = for_platform(config, devices[0].platform)
  ratio = max(1, int(config.train.eval_batch_size) // max(1, int(config.train.batch_size)))
  config.train.batch_size = per_chip_batch * n
  config.train.eval_batch_size = per_chip_batch * ratio * n
  registry.validate(config.model)
  mesh = sharding.create_mesh(devices)
  model = registry.from_config(config.model)
  tx = trainer.create_optimizer(config)
  abstract, state_sh = trainer.state_sharding_for(config, model, tx, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    step = trainer.make_train_step(model, tx, mesh, state_sh)
    train = step.lower(_sds(abstract, state_sh), _batch(config, per_chip_batch * n, batch_sh))
    train = train.compile()
    train_s = time.perf_counter() - start
    evaluation, eval_s = None, 0.0
    if with_eval:
      start = time.perf_counter()
      variables = trainer.state_variables(abstract)
      var_sh = trainer.state_variables(state_sh)
      images = _batch(config, per_chip_batch * ratio * n, batch_sh)["image"]
      forward = engine.jitted_forward(model, mesh, saliency=True, levels=False)
      evaluation = forward.lower(_sds(variables, var_sh), images).compile()
      eval_s = time.perf_counter() - start
  return Compiled(
    config=config,
    chip=chip,
    devices=devices,
    mesh=mesh,
    per_chip_batch=per_chip_batch,
    eval_per_chip_batch=per_chip_batch * ratio,
    train=train,
    eval=evaluation,
    train_seconds=train_s,
    eval_seconds=eval_s,
    batch_sharding=batch_sh,
    state_sharding=state_sh,
    abstract_state=abstract,
  )


# --------------------------------------------------------------------------- the report


def hbm(executable: Any) -> dict[str, int]:
  """Per-device HBM of a compiled program, from its `memory_analysis()`."""
  m = executable.memory_analysis()
  out = {
    "arguments": int(m.argument_size_in_bytes),
    "outputs": int(m.output_size_in_bytes),
    "aliased": int(m.alias_size_in_bytes),
    "temporaries": int(m.temp_size_in_bytes),
    "code": int(m.generated_code_size_in_bytes),
  }
  out["total"] = (
    out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
  )
  return out


def cost(executable: Any) -> dict[str, float]:
  """Per-device flops and bytes accessed of one run of a compiled program."""
  c = executable.cost_analysis()
  if isinstance(c, list | tuple):
    c = c[0]
  return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def _spec(s: Any) -> str:
  return str(s.spec) if isinstance(s, jax.NamedSharding) else str(s)


def parameter_groups(abstract_params: Any, shardings: Any) -> list[dict[str, Any]]:
  """Per top-level parameter module (stem, down1, dense2, up3, head, pool, ...): its
  parameter count, float32 bytes and the PartitionSpecs of its leaves."""
  groups: dict[str, dict[str, Any]] = collections.OrderedDict()
  flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  for (path, leaf), s in zip(flat, specs, strict=True):
    name = str(getattr(path[0], "key", path[0]))
    g = groups.setdefault(name, {"group": name, "params": 0, "bytes": 0, "specs": set()})
    g["params"] += math.prod(leaf.shape)
    g["bytes"] += math.prod(leaf.shape) * leaf.dtype.itemsize
    g["specs"].add(_spec(s))
  return [dict(g, specs=sorted(g["specs"])) for g in groups.values()]


def _step_report(executable: Any, seconds: float, capacity: int) -> dict[str, Any]:
  memory = hbm(executable)
  return {
    "compile_s": seconds,
    "hbm": memory,
    "fits": memory["total"] <= capacity,
    "headroom_bytes": capacity - memory["total"],
    **cost(executable),
    "collectives": accelerators.collectives(executable.as_text()),
  }


def report(c: Compiled, capacity: int | None = None) -> dict[str, Any]:
  """Plain data (JSON-ready) for a `Compiled`; `capacity` overrides the chip's HBM bytes."""
  capacity = int(c.chip.hbm_bytes if capacity is None else capacity)
  n = len(c.devices)
  m = c.config.model
  train = _step_report(c.train, c.train_seconds, capacity)
  line = accelerators.roofline(train["flops"], train["bytes"], c.chip)
  per_chip = c.per_chip_batch / line["step_s"] if line["step_s"] > 0 else math.inf
  slices = sorted({getattr(d, "slice_index", 0) for d in c.devices})
  moved = accelerators.traffic(c.train.as_text())
  total_moved = sum(moved.values()) or 1
  train.update(
    # What moves the bytes (tile-padded HLO operand and result bytes by model part).
    traffic=[
      {"where": k, "bytes": v, "share": v / total_moved}
      for k, v in sorted(moved.items(), key=lambda kv: -kv[1])[:12]
    ],
    roofline=line,
    flops_per_image=train["flops"] / c.per_chip_batch,
    images_per_s_chip=per_chip,
    images_per_s_slice=per_chip * n / len(slices),
    images_per_s=per_chip * n,
    hours_per_epoch=NIH_TRAIN_IMAGES / (per_chip * n) / 3600,
  )
  image_sh = c.batch_sharding
  global_shape = (c.per_chip_batch * n, int(m.input_size), int(m.input_size), 1)
  out = {
    "generation": c.chip.name,
    "peaks_source": c.chip.source,
    "devices": n,
    "hosts": len({d.process_index for d in c.devices}),
    "slices": len(slices),
    "mesh": {str(k): int(v) for k, v in c.mesh.shape.items()},
    "config": str(c.config.name),
    "dtype": str(m.dtype),
    "param_dtype": "float32",  # lsemil.models.layers: params and Adam moments stay float32
    "batch_norm_impl": str(m.get("batch_norm_impl", "")),
    "conv_weight_grad": str(m.get("conv_weight_grad", "")),
    "dense_impl": str(m.get("dense_impl", "")),
    "up_impl": str(m.get("up_impl", "")),
    "remat": str(m.get("remat_policy", "nothing")) if m.get("remat") else "off",
    "fsdp": bool(c.config.train.fsdp),
    "per_chip_batch": c.per_chip_batch,
    "global_batch": c.per_chip_batch * n,
    "hbm_capacity": capacity,
    "input_sharding": {
      "spec": _spec(image_sh),
      "devices": len(image_sh.device_set),
      "images_per_device": int(image_sh.shard_shape(global_shape)[0]),
    },
    "parameter_groups": parameter_groups(c.abstract_state.params, c.state_sharding.params),
    "train": train,
  }
  fits = train["fits"]
  if c.eval is not None:
    out["eval"] = dict(
      _step_report(c.eval, c.eval_seconds, capacity), per_chip_batch=c.eval_per_chip_batch
    )
    fits = fits and out["eval"]["fits"]
  out["fits"] = fits
  return out


# --------------------------------------------------------------------------- max batch


def largest_batch(
  fits: Callable[[int], bool], limit: int = 4096, step: int = 1, start: int | None = None
) -> tuple[int, dict[int, bool]]:
  """The largest multiple b of `step` in [step, limit] with fits(b), assuming fits is
  monotone (it holds up to some b and not above). From `start` (a guess, rounded down to a
  multiple of `step`; default `step`), steps of `step`, 2 `step`, 4 `step`, ... up while it
  fits (from `step`: doubling) or down while it does not, then bisection: a good guess
  costs two compiles (the guess and one step above). Returns (b, or 0 when `step` does not
  fit; {batch: fits} of every batch tried)."""
  if step < 1 or limit < step:
    raise ConfigError(f"the batch search needs 1 <= step <= limit, got step {step}, limit {limit}")
  tried: dict[int, bool] = {}

  def check(k: int) -> bool:
    if k * step not in tried:
      tried[k * step] = bool(fits(k * step))
    return tried[k * step]

  top = limit // step
  k = 1 if start is None else min(max(1, start // step), top)
  stride = k if start is None else 1
  good, bad = (k, None) if check(k) else (None, k)
  while bad is None:  # up
    nxt = min(good + stride, top)
    if nxt == good:
      return good * step, tried
    good, bad = (nxt, None) if check(nxt) else (good, nxt)
    stride *= 2
  while good is None:  # down
    if bad == 1:
      return 0, tried
    nxt = max(bad - stride, 1)
    good, bad = (nxt, bad) if check(nxt) else (None, nxt)
    stride *= 2
  while bad - good > 1:
    mid = (good + bad) // 2
    if check(mid):
      good = mid
    else:
      bad = mid
  return good * step, tried
