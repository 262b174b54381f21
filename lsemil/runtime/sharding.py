"""Device mesh, shardings and multi-host helpers for training (paper Sec 4.2 at scale).

The paper trains on one GPU; here the same jitted step runs on one device, many devices
or many hosts:

- one mesh with axes ('data', 'model') = (all devices, 1), created in `create_mesh`;
- the global batch is sharded over 'data' (`batch_sharding`), assembled from each
  process's local batch with `jax.make_array_from_process_local_data` (`global_batch`);
- the train state is replicated (`P()`) by default; with `fsdp=True` every leaf of at
  least `fsdp_min_size` elements is split over 'data' along its largest dimension that
  the data axis divides (FSDP / ZeRO-3 style; XLA inserts the all-gathers). Adam's
  moments have the parameters' shapes, so they are split the same way.

Axis types are `Auto`, the mode the Linen jit examples (flax lm1b, big_vision) are written
for: shardings are given to `jax.jit` and the compiler propagates them inside the step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType

DATA, MODEL = "data", "model"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh of shape (len(devices), 1); all devices by default.

  On a multi-slice TPU (devices with several `slice_index`es) 'data' runs over the slices
  (DCN, outer) and then each slice's chips (ICI, inner): `jax.make_mesh` refuses such
  topologies, so the device order comes from `mesh_utils.create_hybrid_device_mesh`.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_hybrid_device_mesh(
      (len(devices) // slices, 1), (slices, 1), devices, allow_split_physical_axes=True
    )
    return jax.sharding.Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))
  return jax.make_mesh(
    (len(devices), 1), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
  )


def replicated(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  return jax.NamedSharding(mesh, jax.P())


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return jax.NamedSharding(mesh, jax.P(DATA))


def fsdp_spec(shape: Sequence[int], data_size: int, min_size: int) -> jax.P:
  """The PartitionSpec of one leaf under FSDP: split the largest divisible dim over 'data'.

  Leaves smaller than `min_size` elements, scalars, and leaves with no dimension divisible
  by the data axis size stay replicated.
  """
  if data_size <= 1 or not shape or math.prod(shape) < min_size:
    return jax.P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % data_size == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return jax.P(*spec)
  return jax.P()


def state_shardings(
  abstract_state: Any, mesh: jax.sharding.Mesh, *, fsdp: bool = False, min_size: int = 2**18
) -> Any:
  """A tree of NamedShardings matching `abstract_state` (leaves with .shape)."""
  data_size = mesh.shape[DATA]

  def one(leaf):
    if not fsdp:
      return replicated(mesh)
    return jax.NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), data_size, min_size))

  return jax.tree.map(one, abstract_state)


def global_batch(local_batch: Any, sharding: jax.NamedSharding) -> Any:
  """This process's batch (a pytree of numpy arrays) -> one global jax.Array per leaf.

  Every process passes its own `B / process_count` rows; the result has the global batch
  `B` on its leading axis, split over 'data'.
  """
  return jax.make_array_from_process_local_data(sharding, local_batch)


def to_host(tree: Any) -> Any:
  """Fully replicated (or single-process) arrays -> numpy on this host."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def check_batch_sizes(global_batch_size: int, what: str = "train.batch_size") -> None:
  """Raises ValueError unless the global batch divides over processes and devices."""
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch_size < 1 or global_batch_size % devices:
    raise ValueError(
      f"config {what}={global_batch_size} must be a positive multiple of the device count "
      f"({devices} devices over {processes} processes)"
    )


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Starts jax.distributed when asked; returns True when running multi-process.

  Asked means: any of the arguments is given, or env LSEMIL_MULTIHOST=1 (set by the
  tpu_scripts; on Cloud TPU `initialize()` needs no arguments). Idempotent. Must run
  before anything touches the devices.
  """
  requested = (
    coordinator_address is not None
    or num_processes is not None
    or process_id is not None
    or os.environ.get("LSEMIL_MULTIHOST", "") == "1"
  )
  if requested and not jax.distributed.is_initialized():
    # Cross-process collectives on CPU devices need gloo; harmless on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator_address is not None:
      kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
      kwargs["num_processes"] = int(num_processes)
    if process_id is not None:
      kwargs["process_id"] = int(process_id)
    logging.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
  return jax.process_count() > 1
