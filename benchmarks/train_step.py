"""Throughput of the compiled train step (paper Sec 4.2 training), on synthetic batches.

  python benchmarks/train_step.py --config demo --batch 16
  python benchmarks/train_step.py --config paper --batch 4 --steps 3 --windows 3
  python benchmarks/train_step.py --config paper --batch 16 --dtype bfloat16,float32
  python benchmarks/train_step.py --config paper --variant '' --variant batch_norm_impl=flax
  python benchmarks/train_step.py --config demo --torch-python /path/to/torch_venv/bin/python

For each (variant, batch, resolution, dtype) it compiles `lsemil.training.trainer.train_step`
exactly as training does (same mesh, shardings and donation), runs `--warmup` untimed steps and then
`--windows` timed windows of `--steps` steps on one random global batch, and prints one
markdown row:

- images/s: global batch * steps / wall time of a window (blocked on the result): the median,
  min and max over the windows; step ms from the median;
- compile s: lowering + compilation;
- GFLOP/img: forward + backward (+ Adam) per image from XLA's cost analysis of the lowered
  step (the compiled one misses cuDNN convolutions on GPUs);
- MFU: achieved FLOP/s over the peak for the compute dtype: dense bf16 for bfloat16, TF32
  for float32 on GPUs (the TPU's float32 matmuls run as bf16 passes: its bf16 peak); on a
  CPU the peak of a measured float32 / bfloat16 GEMM (or --peak-tflops);
- roofline ms: the ideal step time from a census of the model's convolutions (traced from
  the forward pass): each conv reads its input and weights and writes its output once per
  pass (forward; input gradient, except for the stem, whose input is data; weight gradient),
  BN / ReLU / concatenation / upsampling fused into them, plus Adam reading and writing
  params, grads and moments once; time = sum over passes of max(FLOPs / peak, bytes /
  bandwidth). "of roofline" = roofline ms / measured step ms. Peaks and bandwidths: the
  table below for known chips, --peak-tflops / --bandwidth-gbs, or measured on a CPU;
- residual MB/img: what the backward pass keeps from the forward one, from
  `jax.ad_checkpoint.print_saved_residuals` of the loss (params excluded), per image, and the
  float32 share of it;
- XLA temp MB: the compiled step's temporary buffers; peak MB: the device's peak memory in
  use, where the backend reports it;
- load1: the mean 1-minute load average after each window (the machine's other work);
- torch images/s, lsemil/torch: with `--torch-python` (default: this interpreter when it
  can import torch), the PyTorch twin ../shared/peers/torch_twin/bench.py on the same
  device, config, batch and precision (bf16 autocast for bfloat16), run after each lsemil
  window (alternating); the median over its runs. Only for the demo and paper configs at
  their own resolution and with no --variant changing the model beyond speed options.
  Without torch the benchmark says so and goes on.

`--variant k=v,k=v` (repeatable; '' = the config as is) sets model config fields, e.g. the
speed options batch_norm_impl, conv1x1_impl, conv_weight_grad, stem_impl, dense_impl, up_impl
(configs/paper.py).
`--interleave` compiles every setting first and then runs their windows round-robin, so
a shared machine's changing load falls on all of them alike (for before/after tables).
`--json FILE` appends one JSON line per row. No data or checkpoint is needed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWIN = REPO.parent / "shared" / "peers" / "torch_twin"

# Per chip (matched against jax's device_kind, first match wins): dense bf16 TFLOP/s, dense
# TF32 TFLOP/s (what float32 convs and dots use by default), HBM TB/s.
CHIPS: tuple[tuple[str, float, float, float], ...] = (
  ("h200", 989.0, 494.0, 4.8),
  ("h100", 989.0, 494.0, 3.35),  # SXM; a PCIe card peaks lower (756 / 378, 2.0 TB/s)
  ("a100", 312.0, 156.0, 2.0),  # 80 GB SXM (40 GB: 1.56 TB/s)
  ("tpu v6 lite", 918.0, 918.0, 1.64),  # v6e; TPU float32 matmuls run as bf16 passes
  ("tpu v6e", 918.0, 918.0, 1.64),
  ("tpu v5 lite", 197.0, 197.0, 0.82),  # v5e
  ("tpu v5e", 197.0, 197.0, 0.82),
  ("tpu v5p", 459.0, 459.0, 2.76),
  ("tpu v5", 459.0, 459.0, 2.76),
  ("tpu v4", 275.0, 275.0, 1.2),
)


def chip_peaks(device_kind: str) -> tuple[float, float, float] | None:
  """(bf16 TFLOP/s, TF32 TFLOP/s, TB/s) of a known chip, else None."""
  kind = device_kind.lower()
  for key, bf16, tf32, bw in CHIPS:
    if key in kind:
      return bf16, tf32, bw
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
  p.add_argument("--variant", action="append", default=None, help="k=v,k=v model fields")
  p.add_argument("--steps", type=int, default=5, help="timed steps per window")
  p.add_argument("--windows", type=int, default=3, help="timed windows (median, min, max)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument(
    "--interleave", action="store_true", help="compile all settings, then alternate windows"
  )
  p.add_argument("--fsdp", action="store_true", help="FSDP-shard large params over 'data'")
  p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU and roofline")
  p.add_argument("--bandwidth-gbs", type=float, default=None, help="memory GB/s for roofline")
  p.add_argument("--no-residuals", action="store_true", help="skip the saved-residual count")
  p.add_argument("--torch-python", default=None, help="python of a venv with torch (the twin)")
  p.add_argument("--no-torch", action="store_true", help="do not run the PyTorch twin")
  p.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="twin CPU threads")
  p.add_argument("--json", default=None, help="append one JSON line per row to this file")
  p.add_argument("--no-header", action="store_true", help="print rows only")
  return p.parse_args(argv)


HEADER = (
  "| config | variant | device | batch | res | dtype | compile s | images/s median (min-max) "
  "| step ms | GFLOP/img | MFU | roofline ms | of roofline | residual MB/img (f32) "
  "| XLA temp MB | peak MB | torch images/s | lsemil/torch | load1 |\n"
  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _flops(lowered) -> float:
  try:
    cost = lowered.cost_analysis()
  except Exception:  # noqa: BLE001  (backends without an analysis raise various errors)
    return float("nan")
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float((cost or {}).get("flops", float("nan")))


# ---------------------------------------------------------------------------- device peaks


@functools.cache
def measured_cpu_peaks(dtype: str) -> tuple[float, float]:
  """(TFLOP/s of a 2048^2 GEMM in `dtype`, GB/s of an elementwise pass over 256 MB) here."""
  import jax
  import jax.numpy as jnp

  def best(f, *a, reps=3):
    jax.block_until_ready(f(*a))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      times.append(time.perf_counter() - t0)
    return min(times)

  n = 2048
  a = jnp.ones((n, n), jnp.dtype(dtype))
  tflops = 2 * n**3 / best(jax.jit(lambda a: a @ a), a) / 1e12
  x = jnp.ones((64 * 2**20,), jnp.float32)
  gbs = 2 * x.nbytes / best(jax.jit(lambda x: x * 1.5 + 1.0), x) / 1e9
  return tflops, gbs


def device_peaks(args, dtype: str) -> tuple[float | None, float | None, str]:
  """(peak TFLOP/s for `dtype`, bandwidth GB/s, where they come from)."""
  import jax

  dev = jax.devices()[0]
  known = chip_peaks(dev.device_kind) if dev.platform != "cpu" else None
  peak = bw = None
  source = "flags"
  if known:
    peak = known[0] if dtype == "bfloat16" else known[1]
    bw, source = known[2] * 1e3, "table"
  elif dev.platform == "cpu":
    peak, bw = measured_cpu_peaks(dtype)
    source = "measured"
  peak = args.peak_tflops or peak
  bw = args.bandwidth_gbs or bw
  return peak, bw, source


# ---------------------------------------------------------------------------- roofline census


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for item in v if isinstance(v, list | tuple) else (v,):
      if hasattr(item, "eqns"):
        yield item
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        yield item.jaxpr


def _convs(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      yield eqn
    for sub in _sub_jaxprs(eqn):
      yield from _convs(sub)


def conv_census(model, batch: int) -> list[dict]:
  """Per convolution of the training forward pass: shapes, FLOPs and bytes of each pass.

  Traced with the plain implementations (every conv a convolution, flax BatchNorm), so the
  census describes the model, not a lowering of it.
  """
  import jax
  import jax.numpy as jnp

  from lsemil.models import mil

  plain = model.clone(conv1x1_impl="conv", stem_impl="conv", conv_weight_grad="xla")
  plain = plain.clone(dense_impl="concat", up_impl="concat")
  variables = jax.eval_shape(lambda: mil.init_variables(plain, jax.random.key(0)))
  s = plain.input_size
  x = jax.ShapeDtypeStruct((batch, s, s, 1), jnp.float32)
  fn = functools.partial(plain.apply, train=True, mutable=["batch_stats"])
  jaxpr = jax.make_jaxpr(fn)(variables, x).jaxpr
  rows = []
  for eqn in _convs(jaxpr):
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    kh, kw, cin, _ = rhs.shape
    item = jnp.dtype(out.dtype).itemsize
    b_in, b_w, b_out = (a.size * item for a in (lhs, rhs, out))
    flops = 2.0 * out.size * kh * kw * cin
    stem = lhs.shape[1:] == (s, s, 1)
    passes = [(flops, b_in + b_w + b_out), (flops, b_in + b_out + b_w)]  # forward, dW
    if not stem:
      passes.append((flops, b_out + b_w + b_in))  # dX
    rows.append({"shape": (lhs.shape, rhs.shape, out.shape), "passes": passes})
  return rows


def roofline_ms(census, n_params: int, peak_tflops: float, bw_gbs: float) -> float:
  t = sum(max(f / (peak_tflops * 1e12), b / (bw_gbs * 1e9)) for r in census for f, b in r["passes"])
  t += 7 * 4 * n_params / (bw_gbs * 1e9)  # Adam: read param, grad, m, v; write param, m, v
  return t * 1e3


# ---------------------------------------------------------------------------- residuals

_AVAL = re.compile(r"^(\w+)\[([\d,]*)\]")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i32": 4, "u8": 1, "bool": 1, "i8": 1}


def saved_residuals_bytes(model, variables, batch: dict) -> tuple[int, int]:
  """(all, float32) bytes the loss's VJP saves, params excluded (print_saved_residuals)."""
  from jax import ad_checkpoint

  from lsemil.training import objective

  def loss(params):
    out, _ = model.apply(
      {"params": params, "batch_stats": variables.get("batch_stats", {})},
      batch["image"],
      train=True,
      mutable=["batch_stats"],
    )
    return objective.binary_cross_entropy(out["probs"], batch["labels"])

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    ad_checkpoint.print_saved_residuals(loss, variables["params"])
  total = f32 = 0
  for line in buf.getvalue().splitlines():
    m = _AVAL.match(line)
    if not m or "from the argument" in line:
      continue
    dims = [int(d) for d in m.group(2).split(",") if d]
    size = _ITEMSIZE.get(m.group(1), 4)
    for d in dims:
      size *= d
    total += size
    f32 += size if m.group(1) == "f32" else 0
  return total, f32


# ---------------------------------------------------------------------------- the step


def prepare(config, *, batch: int, warmup: int, args) -> dict:
  """Compiles the step; returns facts and `window(steps) -> seconds`."""
  import jax
  import numpy as np

  from lsemil.models import mil
  from lsemil.runtime import sharding
  from lsemil.training import trainer

  config.train.batch_size = batch
  trainer.validate_config(config)
  model = mil.from_config(config.model)
  tx = trainer.create_optimizer(config)
  mesh = sharding.create_mesh()
  _, state_sh = trainer.state_sharding_for(config, model, tx, mesh)
  state = trainer.init_state(config, model, tx, mesh, state_sh)
  rng = np.random.default_rng(0)
  s, k = int(config.model.input_size), int(config.model.num_classes)
  local = batch // jax.process_count()  # this process's share of the global batch
  host = {
    "image": rng.integers(0, 256, size=(local, s, s, 1)).astype(np.uint8),
    "labels": (rng.uniform(size=(local, k)) < 0.1).astype(np.float32),
  }
  residual = (float("nan"), float("nan"))
  if not args.no_residuals:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    residual = saved_residuals_bytes(model, variables, host)
  step = trainer.make_train_step(model, tx, mesh, state_sh)
  with jax.set_mesh(mesh):
    gb = sharding.global_batch(host, sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    lowered = step.lower(state, gb)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # The lowered (whole-mesh, pre-partitioning) program: after GPU compilation convs
    # become cuDNN custom calls that XLA counts as 0 FLOPs.
    flops_step = _flops(lowered)
    if not np.isfinite(flops_step):
      plain = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx))
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, gb))
      flops_step = _flops(plain.trace(*abstract).lower(lowering_platforms=("cpu",)))
    for _ in range(warmup):
      state, m = compiled(state, gb)
    jax.block_until_ready(state)
  try:
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
  except Exception:  # noqa: BLE001  (not every backend has it)
    temp_mb = float("nan")
  holder = {"state": state}

  def window(steps: int) -> float:
    with jax.set_mesh(mesh):
      st = holder["state"]
      t0 = time.perf_counter()
      for _ in range(steps):
        st, m = compiled(st, gb)
      jax.block_until_ready((st, m))
      dt = time.perf_counter() - t0
    holder["state"] = st
    if not np.isfinite(float(m["loss"])):
      raise FloatingPointError("non-finite loss in the benchmark")
    return dt

  return {
    "model": model,
    "n_params": mil.param_count(state.params),
    "compile_s": compile_s,
    "flops_step": flops_step,
    "residual_bytes": residual,
    "temp_mb": temp_mb,
    "window": window,
  }


def peak_memory_mb() -> float:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return peak / 2**20 if peak else float("nan")


# ---------------------------------------------------------------------------- the twin


def torch_python(args) -> str | None:
  if args.no_torch:
    return None
  if args.torch_python:
    return args.torch_python
  try:
    import torch  # noqa: F401
  except ImportError:
    return None
  return sys.executable


def run_twin(py: str, *, config: str, batch: int, steps: int, dtype: str, args) -> dict | None:
  import jax

  device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "twin.jsonl"
    cmd = [
      py,
      str(TWIN / "bench.py"),
      "--config",
      config,
      "--batch",
      str(batch),
      "--steps",
      str(steps),
      "--warmup",
      str(max(args.warmup, 1)),
      "--device",
      device,
      "--amp",
      "bf16" if dtype == "bfloat16" else "none",
      "--threads",
      str(args.torch_threads),
      "--json",
      str(out),
      "--no-header",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
      print(f"torch twin failed ({proc.returncode}): {tail[0]}", file=sys.stderr)
      return None
    return json.loads(out.read_text().splitlines()[-1])


def _fmt(x, spec, blank=""):
  import math

  return blank if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# Model fields that change speed only (same parameters, same sums up to float rounding): a
# variant of these still compares with the twin.
SPEED_OPTIONS = ("batch_norm_impl", "conv1x1_impl", "conv_weight_grad", "stem_impl", "dense_impl",
                 "up_impl")  # fmt: skip


def setup_setting(args, *, variant: str, batch: int, res: int, dtype: str, twin_py) -> dict:
  """Compiles one setting; its windows run later (`run_round`), maybe interleaved."""
  from lsemil.core.configuration import load_config

  config = load_config(args.config)
  config.model.input_size, config.model.dtype, config.train.fsdp = res, dtype, args.fsdp
  for item in filter(None, variant.split(",")):
    key, value = item.split("=", 1)
    try:
      config.model[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      config.model[key] = value  # a bare string
  prep = prepare(config, batch=batch, warmup=args.warmup, args=args)
  twin_name = args.config if args.config in ("demo", "paper") else None
  speed_only = all(
    item.split("=")[0] in SPEED_OPTIONS
    for item in filter(None, variant.split(","))
  )
  base_res = int(load_config(args.config).model.input_size)
  use_twin = bool(twin_py and twin_name and res == base_res and speed_only)
  return {
    "prep": prep,
    "variant": variant,
    "batch": batch,
    "res": res,
    "dtype": dtype,
    "twin": (twin_py, twin_name) if use_twin else None,
    "rates": [],
    "twin_rates": [],
    "loads": [],
  }


def run_round(args, setting: dict) -> None:
  """One timed window of lsemil, then (alternating) one run of the twin."""
  batch = setting["batch"]
  setting["rates"].append(batch * args.steps / setting["prep"]["window"](args.steps))
  setting["loads"].append(os.getloadavg()[0])
  if setting["twin"]:
    py, name = setting["twin"]
    r = run_twin(py, config=name, batch=batch, steps=args.steps, dtype=setting["dtype"], args=args)
    if r:
      setting["twin_rates"].append(r["images_per_s"])


def summarize(args, setting: dict) -> dict:
  import jax

  prep, batch, dtype = setting["prep"], setting["batch"], setting["dtype"]
  rates, twin_rates = setting["rates"], setting["twin_rates"]
  variant, res = setting["variant"], setting["res"]
  dev = jax.devices()[0]
  med = statistics.median(rates)
  gflop_img = prep["flops_step"] / batch / 1e9
  peak, bw, peak_source = device_peaks(args, dtype)
  mfu = gflop_img * med / (peak * 1e3 * jax.device_count()) if peak else None
  roof = None
  if peak and bw:
    census = conv_census(prep["model"], batch // jax.device_count())
    roof = roofline_ms(census, prep["n_params"], peak, bw)
  step_ms = batch / med * 1e3
  total, f32 = prep["residual_bytes"]
  twin_med = statistics.median(twin_rates) if twin_rates else None
  return {
    "config": args.config,
    "variant": variant or "default",
    "device": f"{jax.device_count()}x {dev.device_kind}",
    "batch": batch,
    "res": res,
    "dtype": dtype,
    "compile_s": prep["compile_s"],
    "images_s": med,
    "images_s_min": min(rates),
    "images_s_max": max(rates),
    "images_s_windows": rates,
    "step_ms": step_ms,
    "gflop_img": gflop_img,
    "peak_tflops": peak,
    "bandwidth_gbs": bw,
    "peak_source": peak_source,
    "mfu": mfu,
    "roofline_ms": roof,
    "roofline_share": roof / step_ms if roof else None,
    "residual_mb_img": total / batch / 1e6,
    "residual_f32_mb_img": f32 / batch / 1e6,
    "temp_mb": prep["temp_mb"],
    "peak_mb": peak_memory_mb(),
    "torch_images_s": twin_med,
    "torch_images_s_runs": twin_rates,
    "ratio": med / twin_med if twin_med else None,
    "load1": statistics.fmean(setting["loads"]),
  }


def row(r: dict) -> str:
  pct = lambda x: _fmt(None if x is None else 100 * x, ".1f") + ("%" if x is not None else "")  # noqa: E731
  return (
    f"| {r['config']} | {r['variant']} | {r['device']} | {r['batch']} | {r['res']} | {r['dtype']} "
    f"| {r['compile_s']:.1f} | {r['images_s']:.2f} ({r['images_s_min']:.2f}-"
    f"{r['images_s_max']:.2f}) | {r['step_ms']:.1f} | {r['gflop_img']:.3g} | {pct(r['mfu'])} "
    f"| {_fmt(r['roofline_ms'], '.2f')} | {pct(r['roofline_share'])} "
    f"| {_fmt(r['residual_mb_img'], '.1f')} ({_fmt(r['residual_f32_mb_img'], '.1f')}) "
    f"| {_fmt(r['temp_mb'], '.0f')} | {_fmt(r['peak_mb'], '.0f')} "
    f"| {_fmt(r['torch_images_s'], '.2f', 'n/a')} | {_fmt(r['ratio'], '.2f', 'n/a')} "
    f"| {r['load1']:.2f} |"
  )


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from lsemil.core.configuration import load_config

  base = load_config(args.config)
  batches = args.batch or [int(base.train.batch_size)]
  resolutions = args.resolution or [int(base.model.input_size)]
  dtypes = args.dtype or [str(base.model.dtype)]
  variants = args.variant or [""]
  twin_py = torch_python(args)
  if twin_py is None:
    print("torch twin: not run (torch is not importable here; give --torch-python)", flush=True)
  if not args.no_header:
    print(HEADER, flush=True)
  grid = list(itertools.product(variants, batches, resolutions, dtypes))
  groups = [grid] if args.interleave else [[g] for g in grid]
  for group in groups:
    settings = [
      setup_setting(args, variant=v, batch=b, res=r, dtype=d, twin_py=twin_py)
      for v, b, r, d in group
    ]
    for _ in range(args.windows):
      for setting in settings:
        run_round(args, setting)
    for setting in settings:
      r = summarize(args, setting)
      print(row(r), flush=True)
      if args.json:
        with open(args.json, "a") as f:
          f.write(json.dumps(r) + "\n")
      del setting["prep"]  # free the compiled step and its state
  return 0


if __name__ == "__main__":
  sys.exit(main())
