"""Mesh and shardings (lsemil.runtime.sharding) in this process: the FSDP spec rule and the
single-process helpers. `tests/system/test_multidevice.py` runs one train step on 8 devices."""

from __future__ import annotations

import jax
import pytest

from lsemil.runtime import sharding


def test_fsdp_spec_shards_largest_divisible_dim():
  P = jax.P
  assert sharding.fsdp_spec((3, 3, 64, 128), 8, 1) == P(None, None, None, "data")
  assert sharding.fsdp_spec((3, 3, 60, 12), 8, 1) == P()  # nothing divisible by 8
  assert sharding.fsdp_spec((3, 3, 64, 12), 8, 1) == P(None, None, "data", None)
  assert sharding.fsdp_spec((1024, 1024), 8, 2**21) == P()  # below min_size
  assert sharding.fsdp_spec((1024,), 1, 1) == P()  # one device: nothing to split
  assert sharding.fsdp_spec((), 8, 0) == P()


def test_single_process_helpers():
  mesh = sharding.create_mesh()
  assert mesh.axis_names == ("data", "model")
  assert mesh.shape["data"] == jax.device_count() and mesh.shape["model"] == 1
  assert sharding.maybe_initialize_distributed() is False  # not requested: no-op
  with pytest.raises(ValueError, match="multiple of the device count"):
    sharding.check_batch_sizes(0)


def test_multi_slice_mesh_runs_data_over_slices_then_chips():
  """jax.make_mesh refuses multi-slice topologies; two v5e:2x2 slices (compile-only devices
  through libtpu, no TPU) give one 'data' axis of 8, slice 0's chips first."""
  pytest.importorskip("libtpu", reason="the tpu extra (jax[tpu]) is not installed")
  from lsemil.runtime import accelerators

  mesh = sharding.create_mesh(accelerators.topology_devices("v5e:2x2", num_slices=2))
  assert dict(mesh.shape) == {"data": 8, "model": 1}
  assert [d.slice_index for d in mesh.devices.flat] == [0, 0, 0, 0, 1, 1, 1, 1]
