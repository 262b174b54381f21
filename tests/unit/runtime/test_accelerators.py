"""TPU peaks, topology names, the roofline and the HLO collective census
(lsemil.runtime.accelerators): pure functions, no compile (tests/unit/training/
test_compilation.py compiles for real topologies)."""

from __future__ import annotations

import pytest

from lsemil.core.errors import ConfigError
from lsemil.runtime import accelerators

# A compiled TPU module's lines, abridged: a sync all-reduce of a tuple, an async all-gather
# (its -done must not count again), a collective-permute, and an op that merely names one.
HLO = """
  %all-reduce.90 = (f32[8]{0:T(128)S(1)}, f32[8]{0:T(128)S(1)}) all-reduce(%a, %b), channel_id=2
  %all-gather-start.1 = (bf16[4,16]{1,0}, bf16[16,16]{1,0}) all-gather-start(%c), dimensions={0}
  %all-gather-done.1 = bf16[16,16]{1,0} all-gather-done(%all-gather-start.1)
  %collective-permute.3 = u8[2,64,64,1]{3,2,1,0} collective-permute(%d), source_target_pairs={{0,1}}
  %gte = f32[8]{0} get-tuple-element(%all-reduce.90), index=1
"""


def test_collectives_count_each_op_once_with_its_bytes():
  got = accelerators.collectives(HLO)
  assert got["all-reduce"] == {"count": 1, "bytes": 2 * 8 * 4}
  assert got["all-gather"] == {"count": 1, "bytes": (4 * 16 + 16 * 16) * 2}
  assert got["collective-permute"] == {"count": 1, "bytes": 2 * 64 * 64}
  assert got["reduce-scatter"] == {"count": 0, "bytes": 0}


def test_roofline_picks_the_slower_bound():
  chip = accelerators.CHIPS["v5e"]
  line = accelerators.roofline(197e12 * 0.01, 819e9 * 0.05, chip)
  assert line["bound"] == "memory" and line["step_s"] == pytest.approx(0.05)
  assert line["compute_s"] == pytest.approx(0.01) and line["ratio"] == pytest.approx(5.0)
  assert accelerators.roofline(197e12, 1.0, chip)["bound"] == "compute"


def test_topology_names_are_checked_before_libtpu():
  chip, shape = accelerators.parse_topology("v4:2x2x2")
  assert chip.name == "v4" and chip.megacore and shape == (2, 2, 2)
  assert accelerators.parse_topology("v5e:4x4")[0].hbm_bytes == 16 * 2**30
  for bad in ("v5e", "v5e:4", "tpu:2x2", "v3:2x2"):
    with pytest.raises(ConfigError, match="--topology"):
      accelerators.parse_topology(bad)
  with pytest.raises(ConfigError, match="--num-slices"):
    accelerators.topology_devices("v5e:2x2", num_slices=0)


def test_every_generation_cites_its_page():
  assert set(accelerators.CHIPS) == {"v4", "v5e", "v5p", "v6e"}
  for name, chip in accelerators.CHIPS.items():
    assert chip.source == f"https://cloud.google.com/tpu/docs/{name}"
    assert chip.peak_bf16_flops > 1e14 and chip.hbm_bytes_per_s > 5e11 and chip.hbm_bytes > 1e10


def test_quiet_libtpu_keeps_what_the_user_set(monkeypatch):
  monkeypatch.setattr(accelerators, "_tpu_chips_attached", lambda: 0)
  env = {"TPU_ACCELERATOR_TYPE": "v4-8"}
  accelerators.quiet_libtpu(env)
  assert env["TPU_ACCELERATOR_TYPE"] == "v4-8" and env["TPU_SKIP_MDS_QUERY"] == "1"
  monkeypatch.setattr(accelerators, "_tpu_chips_attached", lambda: 4)  # a TPU VM: untouched
  env = {}
  accelerators.quiet_libtpu(env)
  assert env == {}


ENTRY = """
%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
}

ENTRY %main (param: f32[2,32]) -> f32[2,32] {
  %param = f32[2,32]{1,0:T(8,128)} parameter(0), sharding={replicated}
  %fusion.1 = f32[2,32]{1,0:T(8,128)} fusion(%param), kind=kLoop, metadata={op_name="jit(train_step)/jvp(MultiResolutionMIL)/dense4/add"}
  %fusion.2 = bf16[2,32]{1,0} fusion(%fusion.1, %param), metadata={op_name="jit(train_step)/transpose(jvp(MultiResolutionMIL))/dense4/mul"}
  %gte = f32[2,32]{1,0} get-tuple-element(%fusion.1), index=0
  %slice-start.1 = ((f32[2,32]{1,0}), f32[1,32]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%fusion.2), slice={[0:1], [0:32]}
  %slice-done.1 = f32[1,32]{1,0:S(1)} slice-done(%slice-start.1)
  ROOT %fusion.3 = f32[2,32]{1,0} fusion(%fusion.2), metadata={op_name="jit(train_step)/adam/add"}
}
"""  # noqa: E501


def test_traffic_pads_tiles_and_sums_by_model_part():
  assert accelerators.shape_bytes("f32[2,32]{1,0:T(8,128)}") == 2 * 32 * 4
  assert accelerators.shape_bytes("f32[2,32]{1,0:T(8,128)}", tiled=True) == 8 * 128 * 4
  got = accelerators.traffic(ENTRY)
  tile = 8 * 128 * 4
  assert got == {
    "dense4 forward": tile + tile,  # result and operand, each one padded tile
    # its fusion, then the async slice of its output (no metadata): the source once
    "dense4 backward": 2 * 32 * 2 + tile + tile + 2 * 32 * 2,
    "adam": 2 * 32 * 4 + 2 * 32 * 2,
  }
