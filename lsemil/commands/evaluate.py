"""`lsemil evaluate`: AUC, DICE and IoBB accuracy of a checkpoint on a split (Sec 4.2-4.4).

  lsemil evaluate --workdir W [--data-dir D] [--split test] [--out F.json]
  lsemil evaluate --checkpoint W/checkpoints/<step> --data-dir D --out F.json
  lsemil evaluate --workdir G --saliency cam          (a GAP baseline run, configs/baseline_gap.py)
  lsemil evaluate --workdir W --calibrate temperature (fitted on the valid split)
  lsemil evaluate --workdir W --split valid [--operating-point youden|f1|sens=0.9|spec=0.9]
  lsemil evaluate --workdir W --data-dir D --source chexpert   (another source's data)

Writes F.json, F.csv, F_predictions.csv (per image), F_saliency_boxes.npz and, with
--calibrate, F_calibration.json (`lsemil.workflows.evaluation`). The default F is
W/evaluation_<split>.json, or W/evaluation_<split>_<source>.json for a --saliency other than
the run's own, with _on_<S> for another --source S than the run's. On another source's data
only the classes the synonym table pairs are scored (`lsemil.data.synonyms`), each over the
images where its label is known; the output names the pairs and the classes left out.
"""

from __future__ import annotations

import argparse

from lsemil.commands import arguments, progress
from lsemil.core import fileio, log
from lsemil.data import nih, pipeline, sources
from lsemil.inference import engine
from lsemil.metrics import calibration, operating_points
from lsemil.models import registry
from lsemil.runtime import sharding
from lsemil.workflows import evaluation


def _rule(text: str) -> str:
  try:
    operating_points.parse(text)
  except ValueError as e:  # ConfigError
    raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
  return text


def _mapping_text(mapping: dict, auc: dict, known: dict, positives: dict) -> str:
  """The classes a cross-source evaluation scored, under which synonym, and those left out."""
  lines = [f"scored on {mapping['source']} data, {mapping['model_source']} run's class = "
           f"data class (synonym-table finding): AUC, images with the label known, positives"]
  for p in mapping["pairs"]:
    name = p["scored_as"]
    n = known.get(name, "all")
    lines.append(f"  {p['model']} = {p['data']} ({p['finding']}): {auc[name]:.4f}, {n} known, "
                 f"{positives[name]} positive")
  for side, key in (("run", "model_only"), (mapping["source"], "data_only")):
    lines.append(f"left out ({side} classes without a counterpart): "
                 + (", ".join(mapping[key]) or "none"))
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil evaluate",
    description="Per-class AUC (95 percent patient-bootstrap CI), DICE of the box classes "
    "(NIH: 8 of 14; with the uniform-map baseline) and IoBB accuracy (Yao et al. 2018, Sec "
    "4.2-4.4) of a checkpoint on one split. Writes F.json, F.csv, F"
    + evaluation.PREDICTIONS_SUFFIX
    + " (the per-image probabilities) and F"
    + evaluation.SALIENCY_SUFFIX
    + " (saliency maps of the images with boxes). Paths may be relative, ~, absolute or gs://.",
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a training workdir (its best checkpoint, see --which)")
  src.add_argument(
    "--checkpoint", help="a workdir, its checkpoints/ folder or one step folder W/checkpoints/N"
  )
  arguments.add_which(
    p, "checkpoint of a workdir: best validation mean AUC or latest (default best)"
  )
  p.add_argument("--data-dir", help="dataset folder (default: data.data_dir of the run's config)")
  p.add_argument("--split", choices=nih.SPLITS, default="test", help="default test")
  p.add_argument(
    "--source",
    choices=tuple(sources.READERS),
    default=None,
    help="the --data-dir's source (default: the run's own, its config's data.source). "
    "Another source's data is scored on the classes both share (lsemil.data.synonyms), each "
    "over the images where its label is known, localized against the data's boxes of those "
    "classes; calibration and operating points are left out",
  )
  p.add_argument("--out", help="output JSON (default: <workdir>/evaluation_<split>.json)")
  p.add_argument(
    "--n-boot",
    type=arguments.nonnegative_int,
    default=evaluation.DEFAULT_N_BOOT,
    help="bootstrap resamples of patients for AUC CIs "
    f"(default {evaluation.DEFAULT_N_BOOT}; 0 = none)",
  )
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
  p.add_argument(
    "--taus",
    type=arguments.taus,
    default=evaluation.DEFAULT_TAUS,
    help="binarization thresholds tau for IoBB (default 0.1,...,0.9)",
  )
  p.add_argument(
    "--batch-size",
    type=arguments.positive_int,
    default=None,
    help="eval batch size (default: the config's train.eval_batch_size)",
  )
  p.add_argument(
    "--saliency",
    choices=registry.ALL_SOURCES,
    default=None,
    help="saliency map source: model (the MIL model's own maps), gradcam or cam (a GAP "
    "baseline run; maps min-max scaled per image and class). Default: model for MIL runs, "
    "the run's config.saliency.source for GAP runs",
  )
  p.add_argument(
    "--gradcam-level",
    type=int,
    default=None,
    help="down-path level Grad-CAM differentiates at (0 = finest, -1 = coarsest; default: "
    "the run's config.saliency.gradcam_level, else -1)",
  )
  p.add_argument(
    "--calibrate",
    choices=calibration.METHODS,
    default=None,
    help="also fit a temperature or Platt recalibration on the run's valid split, report "
    "ECE / Brier with it, and write its parameters to F" + evaluation.CALIBRATION_SUFFIX + " (for "
    "lsemil predict --calibration)",
  )
  p.add_argument(
    "--operating-point",
    type=_rule,
    default=operating_points.DEFAULT_RULE,
    help="with --split valid: the rule choosing each class's decision threshold p >= t, "
    "stored in the evaluation JSON (export writes it as thresholds.json): youden (default, "
    "max sensitivity + specificity - 1), f1, sens=X (most specific with sensitivity >= X) or "
    "spec=X; on another split the sensitivity and specificity at the thresholds of the "
    "workdir's evaluation_valid.json of the same step are reported",
  )
  p.add_argument(
    "--no-protocols",
    action="store_true",
    help="skip the weak-localization protocols (Wang et al. accuracy / AFP, cheXlocalize "
    "mIoU, pointing games, pixel AUPRC)",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  sharding.maybe_initialize_distributed()
  import jax

  path = fileio.resolve(args.workdir or args.checkpoint)
  loaded = engine.load(path, args.which)
  source, level = registry.saliency_settings(loaded.config, args.saliency, args.gradcam_level)
  own, _ = registry.saliency_settings(loaded.config)
  data_dir = evaluation.resolve_data_dir(
    loaded.config, args.data_dir and fileio.resolve(args.data_dir)
  )
  if args.batch_size:
    loaded.config.train.eval_batch_size = int(args.batch_size)
  other = args.source if args.source not in (None, pipeline.options_of(loaded.config)["source"]) \
    else None  # fmt: skip
  if args.out:
    out = fileio.as_path(args.out)
  else:
    out = evaluation.default_output(
      evaluation.workdir_of(path), args.split, None if source == own else source, other
    )
  level_note = f" at level {level}" if level is not None else ""
  log.info(
    f"checkpoint {loaded.checkpoint} (step {loaded.step}); data {data_dir}; saliency "
    f"{source}{level_note}"
  )
  with progress.bars(not args.no_progress) as bar:
    options = evaluation.EvalOptions(
      n_boot=args.n_boot,
      seed=args.seed,
      taus=tuple(args.taus),
      progress=bar,
      saliency=source,
      gradcam_level=level,
      protocols=not args.no_protocols,
      calibrate=args.calibrate,
      operating_point=args.operating_point,
      thresholds=evaluation.stored_operating_points(evaluation.workdir_of(path), loaded.step),
      source=other,
    )
    run = evaluation.evaluate_checkpoint(loaded, data_dir, args.split, options)
  if jax.process_index() == 0:
    paths = evaluation.write_outputs(run, loaded.config, data_dir, out)
    r = run.result
    undefined = f" ({len(r.auc_undefined)} classes undefined)" if r.auc_undefined else ""
    print(f"mean AUC {r.mean_auc:.4f}{undefined} over {r.num_images} images")
    if r.mapping:
      print(_mapping_text(r.mapping, r.auc, r.num_known or {}, r.num_positives))
    for c, v in r.dice.items():
      print(f"  DICE {c:<14} {v:.3f}  (uniform {r.dice_uniform[c]:.3f})")
    cal = r.calibration or {}
    if cal:
      print(f"ECE {cal['ece_overall']:.4f}, Brier {cal['brier_overall']:.4f} (all classes pooled)")
    if r.calibration_fitted:
      f = r.calibration_fitted
      print(
        f"  {f['method']} (valid fit): ECE {f['ece_overall']:.4f}, Brier {f['brier_overall']:.4f}"
      )
    if r.operating_points:
      ops = r.operating_points
      print(f"operating points ({ops['rule']}, chosen on {ops['fit_split']}): class threshold "
            "sensitivity specificity")  # fmt: skip
      for k, c in enumerate(ops["classes"]):
        cells = []
        for key in ("thresholds", "sensitivity", "specificity"):
          v, lo, hi = (ops.get(key + end, [None] * (k + 1))[k] for end in ("", "_lo", "_hi"))
          ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
          cells.append(("-" if v is None else f"{v:.3f}") + ci)
        print(f"  {c:<18} " + "  ".join(cells))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
  return 0
