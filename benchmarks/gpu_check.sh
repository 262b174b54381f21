#!/usr/bin/env bash
# One prepared GPU session: device facts, the train-step benchmark (paper config at 512x512
# in bf16 and float32, demo config), and a short demo-config training run with evaluation,
# to compare with the CPU numbers in README. Run from the repo root on a CUDA machine with
# jax[cuda] installed (or with PYTHONPATH pointing at the repo):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Results (markdown tables, logs, the evaluation JSON) are written to OUT_DIR.
set -euo pipefail
out="${1:-${OUT:-/tmp/lsemil_gpu}}"
work="${WORK:-/tmp/lsemil_gpu_work}"
mkdir -p "$out" "$work"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"

"$py" benchmarks/train_step.py --config paper --batch 32 --dtype bfloat16,float32 \
  --steps 20 --warmup 3 | tee "$out/bench_paper.md"
"$py" benchmarks/train_step.py --config demo --batch 32 --steps 20 --warmup 3 --no-header \
  | tee "$out/bench_demo.md"

# The demo config end to end: synth -> prepare -> train (r0=5) -> evaluate on test.
"$py" -m lsemil.cli synth --out "$work/nih"
"$py" -m lsemil.cli prepare --nih-dir "$work/nih" --out "$work/prepared" --size 256
"$py" -m lsemil.cli train --config configs/demo.py:r0=5 --workdir "$work/r0_5" \
  --data-dir "$work/prepared" 2>&1 | tr '\r' '\n' | grep -v "^train: " | tee "$out/train_demo.log"
"$py" -m lsemil.cli evaluate --workdir "$work/r0_5" --split test --out "$out/eval_demo.json" \
  2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -40 | tee "$out/eval_demo.log"
