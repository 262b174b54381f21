"""`lsemil demo`: the whole method on the embedded synthetic dataset, on a CPU.

The same code path as the real release, step by step:

1. `synth`     a synthetic dataset in the NIH ChestX-ray14 layout (lsemil.data.synth);
2. `prepare`   resized through the same preparation as the real 1024 px release
               (to 256 px: the demo model reads 128 px, so this keeps the anti-aliased
               downscale and makes decoding 4x cheaper);
3. `train`     configs/demo.py for r0 = 0, 5 and 10 (Sec 3.5's sharpness prior), early
               stopping on the validation mean AUC (Sec 4.2);
4. `reproduce` test-split evaluation of each best checkpoint (AUC, DICE, IoBB) and the
               paper's Tables 1-3 and Figures 1/3 (lsemil.reproduce);
5. a summary: DIR/results/demo_summary.json and a few printed lines, with the bar this
   demo is held to (README): mean test AUC >= 0.90 and DICE above a uniform map's.

Re-running reuses what is there: the dataset, prepared files, finished runs and their
evaluations. `--quick` trains one r0 on a smaller dataset. The command is
`lsemil.commands.demo`.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from pathlib import Path

from lsemil import fileio
from lsemil.data import nih

# DICE groups for the sharpness-prior comparison of Sec 4.3: focal findings, where a larger
# r0 should help, and large or diffuse ones, where it should hurt.
FOCAL_CLASSES = ("Nodule", "Mass")
DIFFUSE_CLASSES = ("Cardiomegaly", "Effusion", "Infiltration", "Pneumonia")

# The bar (README): full mode mean test AUC >= 0.90; --quick, a smaller and shorter run,
# is held to 0.75. Both: mean DICE above that of a uniform map on the same boxes.
FULL = {"patients": 600, "r0": (0.0, 5.0, 10.0), "n_boot": 500, "auc_bar": 0.90}
QUICK = {"patients": 240, "r0": (5.0,), "n_boot": 200, "auc_bar": 0.75}
PREPARE_SIZE = 256


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _r0_label(r0: float) -> str:
  return f"r0={r0:g}"


def _mean(values) -> float:
  vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
  return float(sum(vals) / len(vals)) if vals else float("nan")


def run_summary(result: dict) -> dict:
  """The demo's bar numbers for one evaluated run (a `lsemil evaluate` result dict)."""
  dice, uniform = result["dice"], result["dice_uniform"]
  present = sorted(c for c in dice if not math.isnan(float(dice[c] or "nan")))
  return {
    "mean_auc": result["mean_auc"],
    "classes_in_auc": nih.NUM_CLASSES - len(result["auc_undefined"]),
    "mean_dice": _mean(dice[c] for c in present),
    "mean_dice_uniform": _mean(uniform.get(c) for c in present),
    "dice_focal": _mean(dice.get(c) for c in FOCAL_CLASSES),
    "dice_diffuse": _mean(dice.get(c) for c in DIFFUSE_CLASSES),
    "dice": {c: dice[c] for c in present},
    "dice_uniform": {c: uniform.get(c) for c in present},
  }


def run_demo(
  out: str | os.PathLike,
  *,
  quick: bool = False,
  r0s=None,
  patients: int | None = None,
  epochs: int | None = None,
  workers: int | None = None,
) -> dict:
  """Runs the demo into `out` and returns the summary dict (also DIR/results/...json)."""
  from lsemil import config_lib, reproduce, train
  from lsemil.data import prepare as prepare_lib
  from lsemil.data import synth

  plan = QUICK if quick else FULL
  r0s = tuple(float(r) for r in (r0s or plan["r0"]))
  patients = int(patients or plan["patients"])
  out = Path(out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  timings: dict[str, float] = {}
  start = time.perf_counter()

  _say(f"[1/4] synthetic NIH-layout dataset ({patients} patients) -> {out / 'nih'}")
  t0 = time.perf_counter()
  synth.synthesize(out / "nih", patients=patients, size=512, seed=0, workers=workers)
  timings["synth_s"] = time.perf_counter() - t0

  _say(f"[2/4] prepare to {PREPARE_SIZE} px (the real release's path) -> {out / 'prepared'}")
  t0 = time.perf_counter()
  prepare_lib.prepare(out / "nih", out / "prepared", size=PREPARE_SIZE, workers=workers)
  timings["prepare_s"] = time.perf_counter() - t0

  runs = []
  for i, r0 in enumerate(r0s, 1):
    label = _r0_label(r0)
    workdir = out / "runs" / label.replace("=", "")
    _say(f"[3/4] train configs/demo.py:r0={r0:g} ({i}/{len(r0s)}) -> {workdir}")
    config = config_lib.load_config(f"demo:r0={r0:g}")
    if epochs:
      config.train.num_epochs = int(epochs)
    t0 = time.perf_counter()
    result = train.train_and_evaluate(config, str(workdir), data_dir=str(out / "prepared"))
    timings[f"train_{label}_s"] = time.perf_counter() - t0
    runs.append((label, r0, workdir, result))

  _say(
    f"[4/4] evaluate on the test split and reproduce Tables 1-3, Figures 1/3 -> {out / 'results'}"
  )
  t0 = time.perf_counter()
  summary = reproduce.reproduce_runs(
    [(label, r0, workdir) for label, r0, workdir, _ in runs],
    str(out / "prepared"),
    str(out / "results"),
    n_boot=plan["n_boot"],
  )
  timings["reproduce_s"] = time.perf_counter() - t0
  timings["total_s"] = time.perf_counter() - start

  per_run = {}
  for (label, r0, workdir, train_result), evaluated in zip(runs, summary["runs"], strict=True):
    per_run[label] = {
      "r0": r0,
      "workdir": str(workdir),
      "best_step": train_result["best_step"],
      "best_val_mean_auc": train_result["best_val_mean_auc"],
      **run_summary(evaluated),
    }
  demo = {
    "quick": quick,
    "patients": patients,
    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    "bar": {"mean_auc": plan["auc_bar"], "dice": "above the uniform map's DICE on the same boxes"},
    "runs": per_run,
    "timings_s": {k: round(v, 1) for k, v in timings.items()},
    "results_dir": str(out / "results"),
    "files": {
      name: str(out / "results" / name)
      for name in (
        "report.md",
        "table1.md",
        "table2.md",
        "table3.md",
        "figure1.png",
        "figure3.png",
        "summary.json",
      )
    },
  }
  fileio.write_json(out / "results" / "demo_summary.json", demo, indent=2)
  return demo


def format_summary(demo: dict) -> str:
  lines = [
    "",
    "lsemil demo: " + ("quick" if demo["quick"] else "full") + " run finished in "
    f"{demo['timings_s']['total_s']:.0f} s ({demo['machine']})",
    "",
  ]
  lines.append("| run | test mean AUC | mean DICE | uniform-map DICE | DICE focal | DICE diffuse |")
  lines.append("|---|---|---|---|---|---|")
  for label, r in demo["runs"].items():
    lines.append(
      f"| {label} | {r['mean_auc']:.3f} ({r['classes_in_auc']} classes) | {r['mean_dice']:.3f} "
      f"| {r['mean_dice_uniform']:.3f} | {r['dice_focal']:.3f} | {r['dice_diffuse']:.3f} |"
    )
  bar = demo["bar"]["mean_auc"]
  ok_auc = all(r["mean_auc"] >= bar for r in demo["runs"].values())
  ok_dice = all(r["mean_dice"] > r["mean_dice_uniform"] for r in demo["runs"].values())
  lines += [
    "",
    f"bar: mean AUC >= {bar}: {'met' if ok_auc else 'NOT met'}; "
    f"DICE above the uniform map: {'met' if ok_dice else 'NOT met'}",
    f"tables and figures: {demo['results_dir']} (report.md, table1-3.md, figure1.png, figure3.png)",
    f"summary: {Path(demo['results_dir']) / 'demo_summary.json'}",
  ]
  return "\n".join(lines)
