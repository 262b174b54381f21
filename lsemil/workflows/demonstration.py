"""`lsemil demo`: the whole method on the embedded synthetic dataset, on a CPU.

The same code path as the real release, step by step:

1. `synth`     a synthetic dataset in the NIH ChestX-ray14 layout (lsemil.data.phantoms);
2. `prepare`   resized through the same preparation as the real 1024 px release
               (to 256 px: the demo model reads 128 px, so this keeps the anti-aliased
               downscale and makes decoding 4x cheaper);
3. `train`     configs/demo.py for r0 = 0, 5 and 10 (Sec 3.5's sharpness prior), early
               stopping on the validation mean AUC (Sec 4.2); `--seeds K` trains each r0
               with seeds 0..K-1; the full demo also trains the Grad-CAM / CAM baseline
               (configs/baseline_gap.py:size=demo, the same trainer and schedule);
               `--figure1` adds r0 = 5 models at N = 8, 16 and 64 (the N = 32 one is the
               r0 = 5 run), the four models of the paper's Figure 1;
4. `reproduce` test-split evaluation of each best checkpoint (AUC, DICE, IoBB, calibration)
               and the paper's Tables 1-3 with significance tests, the spread over seeds,
               Table 4 (weak-localization protocols against the baseline, the best
               constant map and a centre prior), the figures and DIR/results/index.html
               (lsemil.workflows.reproduction);
5. a summary: DIR/results/demo_summary.json and a few printed lines, with the bar this
   demo is held to (README): mean test AUC >= 0.90 and DICE above a uniform map's.

Re-running reuses what is there: the dataset, prepared files, finished runs and their
evaluations; demo_summary.json then keeps the first run's step times ('timings_s') and gives
the re-run's beside them ('rerun_timings_s'). `--quick` trains one r0 on a smaller dataset
and adds nothing else (no baseline). The command is `lsemil.commands.demo`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

from lsemil.core import fileio, log
from lsemil.data import nih
from lsemil.reporting.paper_tables import mean_sd as report_mean_sd
from lsemil.workflows import lanes

# DICE groups for the sharpness-prior comparison of Sec 4.3: focal findings, where a larger
# r0 should help, and large or diffuse ones, where it should hurt.
FOCAL_CLASSES = ("Nodule", "Mass")
DIFFUSE_CLASSES = ("Cardiomegaly", "Effusion", "Infiltration", "Pneumonia")

# The bar (README): full mode mean test AUC >= 0.85 (10 epochs, the 15-minute budget on a
# 2-core CPU; the earlier 20-epoch demo was held to 0.90); --quick, a smaller run, is held to
# 0.75. Both: mean DICE above that of a uniform map on the same boxes.
# n_boot: resamples of the AUC CIs and of Table 4's patient-bootstrap intervals (500, not
# evaluate's 1000, to keep the full demo within 15 minutes on 2 cores).
FULL = {"patients": 600, "r0": (0.0, 5.0, 10.0), "n_boot": 500, "auc_bar": 0.85, "gap": True}
QUICK = {"patients": 240, "r0": (5.0,), "n_boot": 200, "auc_bar": 0.75, "gap": False}
PREPARE_SIZE = 256
FIGURE1_N = (8, 16, 32, 64)  # target resolutions of Figure 1 (sides of the demo's levels)
FIGURE1_R0 = 5.0


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


def _workdir(out: Path, r0: float, seed: int = 0, n: int | None = None) -> Path:
  name = _r0_label(r0).replace("=", "")
  name += f"_seed{seed}" if seed else ""
  name += f"_N{n}" if n is not None else ""
  return out / "runs" / name


def _on_cpu() -> bool:
  import jax

  return jax.default_backend() == "cpu"


def _lanes_note() -> str:
  if not _on_cpu():
    return "one after another on the accelerator"
  cores = lanes.available_cores()
  return (
    f"one CPU core each, {len(cores)} at a time (lsemil.workflows.lanes; logs in WORKDIR/train.log)"
  )


def _train_all(jobs, progress: log.Progress | None = None) -> dict[str, dict]:
  """Trains every job: side by side, one core each, on a CPU (`lsemil.workflows.lanes`); one
  after another in this process on an accelerator. Returns each job's result by key."""
  if _on_cpu():
    return lanes.run(jobs, progress=progress)
  from lsemil.core import configuration
  from lsemil.training import trainer

  results = {}
  for job in jobs:
    log.info(f"  train {job.config} -> {job.workdir}")
    config = configuration.load_config(job.config)
    if job.epochs:
      config.train.num_epochs = int(job.epochs)
    t0 = time.perf_counter()
    results[job.key] = trainer.train_and_evaluate(
      config, str(job.workdir), data_dir=str(job.data_dir), progress=progress
    )
    log.info(trainer.final_line(results[job.key]))
    results[job.key]["seconds"] = time.perf_counter() - t0
  return results


def run_demo(
  out: str | os.PathLike,
  *,
  quick: bool = False,
  r0s=None,
  patients: int | None = None,
  epochs: int | None = None,
  workers: int | None = None,
  seeds: int = 1,
  figure1: bool = False,
  progress: log.Progress | None = None,
) -> dict:
  """Runs the demo into `out` and returns the summary dict (also DIR/results/...json).

  seeds: runs per r0 (seeds 0..seeds-1; Table 3 then shows mean ± sd, spread.md each seed);
  figure1: also train the r0 = 5 models at N = 8, 16, 64 and draw the paper's Figure 1.
  Steps are reported through `lsemil.core.log`, long loops to `progress`.
  """
  from lsemil.data import phantoms, preparation
  from lsemil.workflows import reproduction

  plan = QUICK if quick else FULL
  r0s = tuple(float(r) for r in (r0s or plan["r0"]))
  patients = int(patients or plan["patients"])
  seeds = max(1, int(seeds))
  out = Path(out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  data = out / "prepared"
  timings: dict[str, float] = {}
  start = time.perf_counter()

  log.info(f"[1/4] synthetic NIH-layout dataset ({patients} patients) -> {out / 'nih'}")
  t0 = time.perf_counter()
  phantoms.synthesize(
    out / "nih", patients=patients, size=512, seed=0, workers=workers, progress=progress
  )
  timings["synth_s"] = time.perf_counter() - t0

  log.info(f"[2/4] prepare to {PREPARE_SIZE} px (the real release's path) -> {data}")
  t0 = time.perf_counter()
  preparation.prepare(
    out / "nih", data, size=PREPARE_SIZE, workers=workers, progress=progress
  )
  timings["prepare_s"] = time.perf_counter() - t0

  plan_runs = [(r0, seed) for seed in range(seeds) for r0 in r0s]
  fig1_n = [n for n in FIGURE1_N if figure1 and not (n == 32 and FIGURE1_R0 in r0s)]
  epochs = int(epochs) if epochs else None
  jobs, runs = [], []
  for r0, seed in plan_runs:
    workdir = _workdir(out, r0, seed)
    spec = f"demo:r0={r0:g}" + (f",seed={seed}" if seed else "")
    key = f"train_{_r0_label(r0)}" + (f"_seed{seed}" if seed else "") + "_s"
    jobs.append(lanes.Job(key, spec, workdir, data, epochs))
    runs.append((_r0_label(r0), r0, seed, workdir, key))
  baselines = []
  if plan["gap"]:
    workdir = out / "runs" / "gap"
    jobs.append(lanes.Job("train_gap_s", "baseline_gap:size=demo", workdir, data, epochs))
    baselines = [("gradcam", workdir), ("cam", workdir)]
  fig1 = []
  for n in FIGURE1_N if figure1 else ():
    if n not in fig1_n:  # N = 32 is the demo default: the r0 = 5 run
      fig1.append((n, _workdir(out, FIGURE1_R0)))
      continue
    workdir = _workdir(out, FIGURE1_R0, n=n)
    jobs.append(
      lanes.Job(f"train_N{n}_s", f"demo:r0={FIGURE1_R0:g},N={n}", workdir, data, epochs)
    )
    fig1.append((n, workdir))
  log.info(f"[3/4] train {len(jobs)} runs, {_lanes_note()}")
  t0 = time.perf_counter()
  results = _train_all(jobs, progress)
  timings["train_s"] = time.perf_counter() - t0
  timings.update({key: result["seconds"] for key, result in results.items()})
  runs = [(label, r0, seed, workdir, results[key]) for label, r0, seed, workdir, key in runs]

  log.info(
    f"[4/4] evaluate on the test split and reproduce the tables and figures -> {out / 'results'}"
  )
  t0 = time.perf_counter()
  summary = reproduction.reproduce_runs(
    [(label, r0, workdir) for label, r0, _, workdir, _ in runs],
    str(data),
    str(out / "results"),
    n_boot=plan["n_boot"],
    baselines=baselines,
    figure1=fig1,
    calibrate="temperature",
    progress=progress,
  )
  timings["reproduce_s"] = time.perf_counter() - t0
  timings["total_s"] = time.perf_counter() - start
  return _summary(out, quick, patients, plan, runs, summary, timings)


def _summary(out: Path, quick, patients, plan, runs, summary, timings) -> dict:
  per_run, groups = {}, {}
  for (label, r0, seed, workdir, train_result), evaluated in zip(
    runs, summary["runs"], strict=True
  ):
    entry = {
      "r0": r0,
      "seed": seed,
      "workdir": str(workdir),
      "best_step": train_result["best_step"],
      "best_val_mean_auc": train_result["best_val_mean_auc"],
      **run_summary(evaluated),
    }
    per_run[evaluated["name"]] = entry
    groups.setdefault(label, []).append(entry)
  spread = {
    label: {
      "seeds": [e["seed"] for e in entries],
      **{
        key: dict(zip(("mean", "sd"), report_mean_sd([e[key] for e in entries]), strict=True))
        for key in ("mean_auc", "mean_dice")
      },
      "per_seed": {key: [e[key] for e in entries] for key in ("mean_auc", "mean_dice")},
    }
    for label, entries in groups.items()
  }
  results = out / "results"
  files = ["report.md", "table1.md", "table2.md", "table3.md", "spread.md", "table4.md"]
  files += ["calibration.md", *summary["figures"], "summary.json", "index.html"]
  demo = {
    "quick": quick,
    "patients": patients,
    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    "bar": {"mean_auc": plan["auc_bar"], "dice": "above the uniform map's DICE on the same boxes"},
    "runs": per_run,
    "spread": spread,
    "baselines": [b["name"] for b in summary.get("baselines", [])],
    **_timings(results / "demo_summary.json", quick, patients, timings),
    "results_dir": str(results),
    "index_html": summary.get("index_html"),
    "files": {name: str(results / name) for name in files if (results / name).is_file()},
  }
  fileio.write_json(results / "demo_summary.json", demo, indent=2)
  return demo


def _timings(path: Path, quick: bool, patients: int, timings: dict) -> dict:
  """'timings_s': the first run's step times, kept from an earlier demo_summary.json of the
  same mode and dataset; then this run's are 'rerun_timings_s' (a re-run reuses the
  finished steps, so its ~40 s would otherwise replace the real times)."""
  now = {k: round(v, 1) for k, v in timings.items()}
  try:
    before = json.loads(path.read_text())
  except (OSError, ValueError):
    before = None
  same = isinstance(before, dict) and (before.get("quick"), before.get("patients")) == (
    quick, patients
  )
  if not (same and isinstance(before.get("timings_s"), dict)):
    return {"timings_s": now}
  return {"timings_s": before["timings_s"], "rerun_timings_s": now}


def format_summary(demo: dict) -> str:
  mode = "quick" if demo["quick"] else "full"
  first, rerun = demo["timings_s"], demo.get("rerun_timings_s")
  took = f"finished in {(rerun or first)['total_s']:.0f} s ({demo['machine']})"
  if rerun:
    took += (
      f"; a re-run, reusing the finished steps (the first run took {first['total_s']:.0f} s; "
      "demo_summary.json keeps both)"
    )
  lines = ["", f"lsemil demo: {mode} run {took}", ""]
  lines.append("| run | test mean AUC | mean DICE | uniform-map DICE | DICE focal | DICE diffuse |")
  lines.append("|---|---|---|---|---|---|")
  for label, r in demo["runs"].items():
    lines.append(
      f"| {label} | {r['mean_auc']:.3f} ({r['classes_in_auc']} classes) | {r['mean_dice']:.3f} "
      f"| {r['mean_dice_uniform']:.3f} | {r['dice_focal']:.3f} | {r['dice_diffuse']:.3f} |"
    )
  multi = {lb: s for lb, s in demo.get("spread", {}).items() if len(s["seeds"]) > 1}
  if multi:
    lines += [
      "",
      "| r0 | seeds | mean AUC (mean ± sd) | mean DICE (mean ± sd) |",
      "|---|---|---|---|",
    ]
    for label, s in multi.items():
      auc, dice = s["mean_auc"], s["mean_dice"]
      lines.append(
        f"| {label} | {len(s['seeds'])} | {auc['mean']:.3f} ± {auc['sd']:.3f} "
        f"| {dice['mean']:.3f} ± {dice['sd']:.3f} |"
      )
  bar = demo["bar"]["mean_auc"]
  ok_auc = all(r["mean_auc"] >= bar for r in demo["runs"].values())
  ok_dice = all(r["mean_dice"] > r["mean_dice_uniform"] for r in demo["runs"].values())
  lines += [
    "",
    f"bar: mean AUC >= {bar}: {'met' if ok_auc else 'NOT met'}; "
    f"DICE above the uniform map: {'met' if ok_dice else 'NOT met'}",
    f"tables and figures: {demo['results_dir']} (report.md, table1-4.md, spread.md, "
    "calibration.md, figures)",
    f"summary: {Path(demo['results_dir']) / 'demo_summary.json'}",
  ]
  if demo.get("index_html"):
    lines.append(f"report: {demo['index_html']}")
  return "\n".join(lines)
