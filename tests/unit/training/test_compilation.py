"""The smoke config compiled for real TPU topologies on this CPU host
(lsemil.training.compilation, through libtpu: needs the `tpu` extra, skipped without it).

Smoke sizes only: one v5e:2x2 compile shared by the module, one multi-host v5e:4x4 train
step, one more train compile for the batch search."""

from __future__ import annotations

import jax
import pytest

from lsemil.core import configuration
from lsemil.runtime import accelerators
from lsemil.training import compilation

pytest.importorskip("libtpu", reason="the tpu extra (jax[tpu]) is not installed")


@pytest.fixture(scope="module")
def smoke():
  return configuration.load_config("smoke")


@pytest.fixture(scope="module")
def v5e_2x2(smoke):
  chip, _ = accelerators.parse_topology("v5e:2x2")
  compiled = compilation.compile_steps(smoke, accelerators.topology_devices("v5e:2x2"), chip, 8)
  return compiled, compilation.report(compiled)


def _train_fits(config, devices, chip, batch: int, capacity: int) -> bool:
  c = compilation.compile_steps(config, devices, chip, batch, with_eval=False)
  return compilation.report(c, capacity)["train"]["fits"]


def test_auto_options_follow_the_target_not_this_host():
  smoke = configuration.load_config("smoke")
  smoke.model.batch_norm_impl, smoke.model.conv_weight_grad = "auto", "auto"
  assert jax.default_backend() == "cpu"
  tpu = compilation.for_platform(smoke, "tpu").model
  cpu = compilation.for_platform(smoke, "cpu").model
  assert (tpu.batch_norm_impl, tpu.conv_weight_grad) == ("fused", "xla")
  assert (cpu.batch_norm_impl, cpu.conv_weight_grad) == ("flax", "gemm")
  assert (tpu.dense_impl, tpu.up_impl, cpu.dense_impl, cpu.up_impl) == (
    "split", "split", "concat", "concat")  # fmt: skip


def test_inputs_are_sharded_over_every_chip(v5e_2x2):
  compiled, report = v5e_2x2
  devices = set(compiled.devices)
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
  state_in, batch_in = compiled.train.input_shardings[0]
  for leaf in jax.tree.leaves(batch_in):
    assert leaf.device_set == devices and leaf.spec[0] == "data"
  assert report["input_sharding"] == {"spec": "P('data',)", "devices": 4,
                                      "images_per_device": 8}  # fmt: skip
  assert report["batch_norm_impl"] == "fused" and report["dtype"] == "float32"
  groups = {g["group"]: g for g in report["parameter_groups"]}
  assert sum(g["params"] for g in groups.values()) == 15_380  # README's smoke size
  assert groups["head"]["specs"] == ["P()"]  # replicated without fsdp


def test_report_hbm_is_memory_analysis(v5e_2x2):
  compiled, report = v5e_2x2
  for step, exe in (("train", compiled.train), ("eval", compiled.eval)):
    m, h = exe.memory_analysis(), report[step]["hbm"]
    assert h["arguments"] == m.argument_size_in_bytes
    assert h["temporaries"] == m.temp_size_in_bytes
    assert h["code"] == m.generated_code_size_in_bytes
    assert h["total"] == (
      m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
      + m.temp_size_in_bytes + m.generated_code_size_in_bytes
    )  # fmt: skip
    assert report[step]["headroom_bytes"] == 16 * 2**30 - h["total"]
  train = report["train"]
  assert train["flops"] > 0 and train["bytes"] > 0 and train["roofline"]["step_s"] > 0
  assert train["collectives"]["all-reduce"]["count"] > 0  # gradients and BatchNorm statistics


def test_multi_host_topology_compiles_over_all_hosts(smoke):
  chip, _ = accelerators.parse_topology("v5e:4x4")
  devices = accelerators.topology_devices("v5e:4x4")
  c = compilation.compile_steps(smoke, devices, chip, 1, with_eval=False)
  report = compilation.report(c)
  assert (report["devices"], report["hosts"], report["global_batch"]) == (16, 4, 16)
  assert report["input_sharding"]["devices"] == 16
  assert report["train"]["collectives"]["all-reduce"]["count"] > 0


def test_largest_batch_compiles_and_the_next_does_not_fit(smoke, v5e_2x2):
  compiled, report = v5e_2x2
  # A capacity of exactly the train step at 8 per chip, searched in steps of 8 (below 8 the
  # TPU's batch tiling pads, so 1 and 2 need the same HBM): the search must stop at 8.
  capacity = report["train"]["hbm"]["total"]
  known = {8: True}  # the fixture's compile

  def fits(b: int) -> bool:
    return known[b] if b in known else _train_fits(smoke, compiled.devices, compiled.chip, b,
                                                   capacity)  # fmt: skip

  batch, tried = compilation.largest_batch(fits, limit=64, step=8)
  assert batch == 8 and tried == {8: True, 16: False}


def test_largest_batch_bisects():
  for top in (0, 1, 5, 8, 100, 9999):
    batch, tried = compilation.largest_batch(lambda b, top=top: b <= top, limit=256)
    assert batch == min(top, 256)
    assert all(ok == (b <= top) for b, ok in tried.items()) and len(tried) <= 17
  assert compilation.largest_batch(lambda b: b <= 100, limit=256, step=32)[0] == 96


def test_largest_batch_from_a_guess():
  for top in (0, 7, 96, 100, 200, 9999):
    for start in (8, 96, 100, 500):
      batch, tried = compilation.largest_batch(lambda b, t=top: b <= t, 1024, 8, start)
      assert batch == min(top, 1024) // 8 * 8
      assert all(ok == (b <= top) for b, ok in tried.items())
  # A right guess costs two compiles: the guess fits and one step above does not.
  assert compilation.largest_batch(lambda b: b <= 100, 1024, 8, 96)[1] == {96: True, 104: False}
