#!/usr/bin/env bash
# One prepared GPU session (~8 min on one H200): device facts; the train-step benchmark of the
# paper config at 512x512, bf16 and float32, batch 16 (README's batch) and 128, with the
# default speed options and with today's-before ones (flax BatchNorm, 1x1 as convs), beside
# the PyTorch twin (bf16 autocast for bf16) when TORCH_PY points at a python with CUDA torch;
# a jax.profiler trace of the default bf16 step at batch 16 with its top-10 kernels; then each
# lever toggled alone. Sections stop being started once BUDGET_S (default 450 s) is spent.
# Run from the repo root on a CUDA machine with jax[cuda] installed:
#
#   TORCH_PY=/path/to/torch_venv/bin/python bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Writes markdown tables, JSON lines (bench.jsonl), the trace and top10_kernels.md to OUT_DIR.
# FULL=1 also runs the demo config end to end (synth -> prepare -> train -> evaluate; longer).
set -euo pipefail
out="${1:-${OUT:-/tmp/lsemil_gpu}}"
work="${WORK:-/tmp/lsemil_gpu_work}"
mkdir -p "$out" "$work"
py="${PYTHON:-python3}"
budget="${BUDGET_S:-450}"
export PYTHONUNBUFFERED=1
start=$SECONDS
twin=(--no-torch)
if [[ -n "${TORCH_PY:-}" ]]; then twin=(--torch-python "$TORCH_PY"); fi
bench=("$py" benchmarks/train_step.py --config paper --steps 10 --windows 3 --warmup 2
  --json "$out/bench.jsonl")
left() { (( SECONDS - start < budget )) || { echo "budget spent: skipping $1" >&2; return 1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"

# 1. Default vs before, both dtypes, batch 16 and 128, with the twin (alternating windows).
left "defaults" && "${bench[@]}" --batch 16,128 --dtype bfloat16,float32 "${twin[@]}" \
  --variant '' --variant batch_norm_impl=flax,conv1x1_impl=conv | tee "$out/bench_paper.md"

# 2. A profiler trace of the default bf16 step at batch 16; top-10 kernels by total time.
left "profile" && "$py" - "$out" <<'EOF' | tee "$out/top10_kernels.md"
import collections, glob, gzip, json, sys
import jax, numpy as np
sys.path.insert(0, "benchmarks")
import train_step as B
from lsemil.core.configuration import load_config
cfg = load_config("paper"); cfg.model.dtype = "bfloat16"
args = B.parse_args(["--no-residuals"])
prep = B.prepare(cfg, batch=16, warmup=2, args=args)
trace_dir = sys.argv[1] + "/trace"
with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
  prep["window"](10)
files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
events = json.load(gzip.open(files[0]))
events = events.get("traceEvents", events) if isinstance(events, dict) else events
pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
tot = collections.Counter(); cnt = collections.Counter()
for e in events:
  if e.get("ph") == "X" and "gpu" in pids.get(e.get("pid"), "").lower():  # /device:GPU:0 streams
    tot[e["name"]] += e.get("dur", 0); cnt[e["name"]] += 1
all_us = sum(tot.values()) or 1
print(f"top-10 kernels, paper bf16 batch 16, 10 steps ({all_us / 1e3:.1f} ms of device time)")
print("| kernel | calls | total ms | share |\n|---|---|---|---|")
for name, us in tot.most_common(10):
  print(f"| {name[:90]} | {cnt[name]} | {us / 1e3:.2f} | {100 * us / all_us:.1f}% |")
EOF

# 3. Each lever toggled alone against the default (no residual count: it is dtype-level).
for v in batch_norm_impl=flax conv1x1_impl=conv stem_impl=space_to_depth stem_impl=pad8; do
  left "$v" && "${bench[@]}" --batch 16,128 --dtype bfloat16,float32 --no-torch --no-header \
    --no-residuals --variant "$v" | tee -a "$out/bench_levers.md"
done
echo "elapsed $((SECONDS - start)) s" | tee -a "$out/gpu.txt"

if [[ "${FULL:-0}" == 1 ]]; then
  # The demo config end to end: synth -> prepare -> train (r0=5) -> evaluate on test.
  "$py" -m lsemil.commands.cli synth --out "$work/nih"
  "$py" -m lsemil.commands.cli prepare --nih-dir "$work/nih" --out "$work/prepared" --size 256
  "$py" -m lsemil.commands.cli train --config configs/demo.py:r0=5 --workdir "$work/r0_5" \
    --data-dir "$work/prepared" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tee "$out/train_demo.log"
  "$py" -m lsemil.commands.cli evaluate --workdir "$work/r0_5" --split test --out "$out/eval_demo.json" \
    2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -40 | tee "$out/eval_demo.log"
fi
