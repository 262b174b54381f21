"""Throughput of the compiled train step (paper Sec 4.2 training), on synthetic batches.

  python benchmarks/train_step.py --config demo --batch 32
  python benchmarks/train_step.py --config paper --batch 2,4 --resolution 512 --steps 3
  python benchmarks/train_step.py --config paper --batch 16 --dtype float32,bfloat16

For each (config, batch, resolution, dtype) setting it compiles `lsemil.train.train_step`
exactly as training does (same mesh, shardings and donation), runs `--warmup` untimed and
`--steps` timed steps on one random global batch, and prints one markdown table row:

- images/s: global batch * steps / wall time (blocked on the result);
- GFLOP/img: forward + backward (+ the Adam update) per image, from XLA's cost analysis of
  the lowered step (the compiled one misses cuDNN convolutions on GPUs);
- GFLOP/s achieved: GFLOP/img * images/s;
- MFU: achieved FLOP/s over the chip's peak dense bf16 FLOP/s times the device count, on
  known GPUs and TPUs (peaks below; bf16 peak even for float32 runs, so float32 MFU reads
  low by design). Blank on CPUs and unknown chips.

No data or checkpoint is needed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time

# Peak dense bf16 TFLOP/s per chip, matched against jax's device_kind (first match wins).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
  ("h200", 989.0),
  ("h100", 989.0),  # SXM; a PCIe card peaks lower (756)
  ("a100", 312.0),
  ("tpu v6 lite", 918.0),  # v6e
  ("tpu v6e", 918.0),
  ("tpu v5 lite", 197.0),  # v5e
  ("tpu v5e", 197.0),
  ("tpu v5p", 459.0),
  ("tpu v5", 459.0),
  ("tpu v4", 275.0),
)


def peak_tflops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, peak in PEAK_BF16_TFLOPS:
    if key in kind:
      return peak
  return None


def _csv(kind):
  return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="demo", help="config name or path[:arg] (default demo)")
  p.add_argument("--batch", type=_csv(int), default=None, help="global batch(es), e.g. 2,4")
  p.add_argument(
    "--resolution", type=_csv(int), default=None, help="input side(s) (default: the config's)"
  )
  p.add_argument("--dtype", type=_csv(str), default=None, help="float32 and/or bfloat16")
  p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--fsdp", action="store_true", help="FSDP-shard large params over 'data'")
  p.add_argument("--no-header", action="store_true", help="print rows only")
  return p.parse_args(argv)


HEADER = (
  "| config | device | batch | res | dtype | compile s | step ms | images/s | GFLOP/img "
  "| GFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def _flops(lowered) -> float:
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001  (backends without an analysis raise various errors)
    return float("nan")
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float((cost or {}).get("flops", float("nan")))


def bench_one(config, *, batch: int, steps: int, warmup: int) -> dict:
  import jax
  import numpy as np

  from lsemil import model as model_lib
  from lsemil import sharding, train

  config.train.batch_size = batch
  train.validate_config(config)
  model = model_lib.from_config(config.model)
  tx = train.create_optimizer(config)
  mesh = sharding.create_mesh()
  _, state_sh = train.state_sharding_for(config, model, tx, mesh)
  state = train.init_state(config, model, tx, mesh, state_sh)
  rng = np.random.default_rng(0)
  s, k = int(config.model.input_size), int(config.model.num_classes)
  # This process's share of the global batch (every process runs this script).
  local = batch // jax.process_count()
  host = {
    "image": rng.uniform(size=(local, s, s, 1)).astype(np.float32),
    "labels": (rng.uniform(size=(local, k)) < 0.1).astype(np.float32),
  }
  step = train.make_train_step(model, tx, mesh, state_sh)
  with jax.set_mesh(mesh):
    gb = sharding.global_batch(host, sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    lowered = step.lower(state, gb)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # The cost analysis of the lowered (whole-mesh, pre-partitioning) program: after GPU
    # compilation convolutions become cuDNN custom calls that XLA counts as 0 FLOPs.
    flops_step = _flops(lowered)
    if not np.isfinite(flops_step):
      # Some GPU backends give no analysis of the lowered program: count the same step,
      # unsharded, lowered for the CPU (FLOPs do not depend on the platform).
      plain = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, gb))
      flops_step = _flops(plain.trace(*abstract).lower(lowering_platforms=("cpu",)))
    for _ in range(warmup):
      state, m = compiled(state, gb)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, gb)
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t0
  if not np.isfinite(float(m["loss"])):
    raise FloatingPointError("non-finite loss in the benchmark")
  images_s = batch * steps / dt
  gflop_img = flops_step / batch / 1e9
  achieved = gflop_img * images_s
  dev = jax.devices()[0]
  peak = peak_tflops(dev.device_kind) if dev.platform != "cpu" else None
  mfu = achieved / (peak * 1e3 * jax.device_count()) if peak else None
  return {
    "device": f"{jax.device_count()}x {dev.device_kind}",
    "compile_s": compile_s,
    "step_ms": dt / steps * 1e3,
    "images_s": images_s,
    "gflop_img": gflop_img,
    "gflops": achieved,
    "mfu": mfu,
  }


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from lsemil.config_lib import load_config

  base = load_config(args.config)
  batches = args.batch or [int(base.train.batch_size)]
  resolutions = args.resolution or [int(base.model.input_size)]
  dtypes = args.dtype or [str(base.model.dtype)]
  if not args.no_header:
    print(HEADER, flush=True)
  for batch, res, dtype in itertools.product(batches, resolutions, dtypes):
    config = load_config(args.config)
    config.model.input_size, config.model.dtype, config.train.fsdp = res, dtype, args.fsdp
    r = bench_one(config, batch=batch, steps=args.steps, warmup=args.warmup)
    mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(
      f"| {args.config} | {r['device']} | {batch} | {res} | {dtype} | {r['compile_s']:.1f} "
      f"| {r['step_ms']:.1f} | {r['images_s']:.1f} | {r['gflop_img']:.3g} | {r['gflops']:.1f} "
      f"| {mfu} |",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
