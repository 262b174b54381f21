"""`lsemil reproduce`: the paper's Tables 1-3 and Figures 1 and 3 from trained runs (Sec 4.1-4.4),
with the statistics the paper lacks (significance, spread over seeds, calibration) and Table
4's weak-localization protocols, in Markdown / CSV / PNG and one self-contained HTML page.

  lsemil reproduce --run r0=0:W0 --run r0=5:W5 --run r0=10:W10 --data-dir D --out R
      [--run r0=5:W5b ...]                  # more seeds of a label: grouped, mean ± sd
      [--baseline gradcam:WG --baseline cam:WG]   # a GAP run's post-hoc maps (Table 4)
      [--figure1 N=8:W8 --figure1 N=16:W16 ...]   # one model per target resolution N
      [--extra-truth rsna-pneumonia=DIR ...]      # Table 4 on another source's truth too

From the best checkpoint of each run this writes (`lsemil.reporting.paper_tables` formats the
paper's tables):

- R/table1.md/.csv: positives per class per split and boxes (Sec 4.1, Table 1);
- R/table2.md/.csv, R/table2_sweep.md/.csv: IoBB accuracy at T(IoBB) = 0.5 (Table 2);
- R/table3.md/.csv: per-class AUC and DICE beside the paper's columns (Sec 4.3, Table 3). With
  two labels or more, bold marks only a significantly best run (`significance.BOLD_RULE`,
  stated under the table): paired DeLong for AUC on the same test images, paired patient
  bootstrap for DICE on the same box cases, Holm over classes; p-values in the CSV and in
  R/significance.json. A label with several runs (seeds) shows mean ± sd over them, and its
  tests use the seed-averaged probabilities and the seed-averaged DICE of each case;
- R/spread.md/.csv: per label, mean ± sd and each seed's mean AUC and mean DICE;
- R/calibration.md/.csv and R/reliability.png: ECE (15 equal-mass bins) and Brier score of
  every run, raw and, where the evaluation holds a fit, recalibrated; reliability diagrams;
- R/table4.md/.csv: classes x protocols, cheXlocalize's first (mIoU with Otsu, mIoU at the
  tuned threshold, hit rate: `lsemil score`'s code on the stored maps and the boxes,
  `truth_scoring.nih_scores`, with its image bootstrap), then `lsemil.metrics.localization
  .score_all`'s (DICE, Wang et al. accuracy / AFP, energy, pixel AUPRC; patient-bootstrap
  intervals), for each label's first run, each baseline (Grad-CAM / CAM of a GAP run), the
  best constant map and the centre prior; best in bold (`paper_tables.table4_rows`);
- R/table_wsrpn.md/.csv: the WSRPN-style table (RoDeO total and components, AP@0.3, AP@0.5,
  loc-acc) of the same sources, `lsemil score`'s detection family (`paper_tables.wsrpn_table`);
- with --extra-truth SOURCE=DIR: R/table4_SOURCE.md/.csv (cheXlocalize's protocols on that
  source's boxes or masks, run classes matched through the synonym table) and, for boxes,
  R/table_wsrpn_SOURCE.md/.csv (`truth_scoring.source_scores`);
- R/roc_curves.png: per class, every run's ROC curve;
- R/figure3.png: test images with boxes, each run's saliency and DICE (Sec 4.4, Fig. 3);
- R/figure1.png (with --figure1): the paper's Figure 1, one image and class, each model's
  map at its own N; R/figure_levels.png: one model's maps at each level of its up path;
- R/index.html: all of the above and a gallery of every test box case (ground truth and
  each run's saliency with its DICE, sortable by class and DICE), no server or network;
- R/summary.json (everything as data) and R/report.md.

Each run's evaluation is `lsemil.workflows.evaluation.evaluate_checkpoint`; an evaluation JSON
already in the run's workdir (W/evaluation_<split>.json with its saliency .npz and per-image
predictions CSV) is reused when it is of the same checkpoint step, split, dataset and saliency
source.
The command is `lsemil.commands.reproduce`.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsemil.core import fileio, log, tables
from lsemil.core.errors import UserError
from lsemil.data import findings, pipeline, sources
from lsemil.inference import engine
from lsemil.metrics import (
  baselines,
  calibration,
  localization,
  overlap,
  significance,
)
from lsemil.reporting import drawing, html_page, paper_tables, plots
from lsemil.workflows import evaluation, truth_scoring

SIG_N_BOOT = 2000  # paired patient bootstrap of DICE differences (a matmul per resample)
BASELINE_SOURCES = ("gradcam", "cam")
MODEL_FREE = ("constant", "centre")  # Table 4's map sources that need no model


@dataclasses.dataclass
class Run:
  """One evaluated checkpoint and what reproduce reads of it."""

  label: str  # the group label ('r0=5'); several runs may share it (seeds)
  r0: float | None
  workdir: str
  result: dict  # the evaluation (`evaluate.Evaluation.to_dict`) plus label / workdir
  saliency: dict | None  # `evaluate.load_saliency`
  config: Any
  probs: np.ndarray | None  # (n, K) per-image probabilities in the split's row order
  source: str = "model"  # 'model' (the MIL map S) | 'gradcam' | 'cam'
  name: str = ""  # unique display name: the label, or 'label (seed s)' within a group

  @property
  def seed(self) -> int:
    return int(self.config.seed)


# --------------------------------------------------------------------------- runs


def _arch(config) -> str:
  return str(config.model.get("arch", "mil"))


def _options(n_boot: int, progress, source: str, calibrate) -> evaluation.EvalOptions:
  """EvalOptions for a map source (and a recalibration fitted on the valid split)."""
  return evaluation.EvalOptions(
    n_boot=n_boot, progress=progress, saliency=source, calibrate=calibrate
  )


def output_for(workdir, split: str, source: str, config) -> Any:
  """W/evaluation_<split>.json for the run's own maps, W/evaluation_<split>_<source>.json for
  a post-hoc source other than the config's."""
  own = "model" if _arch(config) != "gap" else str(config.saliency.source)
  name = f"evaluation_{split}" + ("" if source in ("model", own) else f"_{source}")
  return fileio.as_path(evaluation.workdir_of(workdir)) / f"{name}.json"


def load_or_evaluate(
  workdir,
  data_dir=None,
  *,
  split: str = "test",
  which: str = "best",
  n_boot: int = evaluation.DEFAULT_N_BOOT,
  force: bool = False,
  progress: log.Progress | None = None,
  source: str | None = None,
  calibrate: str | None = None,
) -> tuple[dict, dict | None, Any]:
  """(evaluation result, saliency dict or None, config) of a run's checkpoint.

  source: the saliency map ('model', 'gradcam', 'cam'; None = the run's own: 'model' for the
  MIL model, `config.saliency.source` for a GAP run); calibrate: 'temperature' | 'platt' fits
  a recalibration on the valid split (None: raw only). Reuses the stored evaluation
  (`output_for`) when it matches the checkpoint's step, the split, the dataset and the
  source and holds the protocols (and the fitted calibration when asked); otherwise
  evaluates (`evaluation.evaluate_checkpoint`, the one inference path) and writes all of
  `lsemil evaluate`'s outputs there (a workdir that cannot be written is only warned about).
  """
  import jax

  loaded = engine.load(workdir, which)
  data_source = pipeline.options_of(loaded.config)["source"]
  if data_source != "nih":  # Tables 1-4 and the figures are the paper's: NIH's layout, boxes
    raise UserError(f"{workdir}: a {data_source} run; reproduce writes the paper's NIH "
                    "tables: score it with `lsemil evaluate --workdir W` (--source S for "
                    "another source's data)")
  gap = _arch(loaded.config) == "gap"
  source = source or (str(loaded.config.saliency.source) if gap else "model")
  if gap == (source == "model"):
    raise UserError(f"{workdir}: saliency source {source!r} does not fit its model")
  data_dir = evaluation.resolve_data_dir(loaded.config, data_dir)
  out = output_for(workdir, split, source, loaded.config)
  sal_path = evaluation.saliency_path_for(out)
  if not force and out.is_file() and sal_path.is_file():
    result = evaluation.load_evaluation(out)
    needs = ("protocols",) + (("calibration_fitted",) if calibrate else ())
    kw = {"step": loaded.step, "split": split, "data_dir": data_dir, "needs": needs}
    if evaluation.matches(result, saliency=source, **kw):
      log.info(f"{workdir}: reusing {out} (step {loaded.step})")
      return dict(result, saliency_source=source), evaluation.load_saliency(sal_path), loaded.config
  options = _options(n_boot, progress, source, calibrate)
  log.info(f"{workdir}: evaluating step {loaded.step} on {split!r} of {data_dir} ({source})")
  run = evaluation.evaluate_checkpoint(loaded, data_dir, split, options)
  run.result.which = which
  result = dict(run.result.to_dict(), saliency_source=source)
  if jax.process_index() != 0:
    return result, None, loaded.config
  try:
    evaluation.write_outputs(run, loaded.config, data_dir, out)
  except OSError as e:
    log.warning(f"could not store the evaluation in {out} ({e})")
    return result, None, loaded.config
  result = dict(run.result.to_dict(), saliency_source=source)  # now with the file names
  return result, evaluation.load_saliency(sal_path), loaded.config


def split_probs(workdir, result: dict, index, rows: np.ndarray) -> np.ndarray | None:
  """The per-image probabilities (n, K) of `rows` from the evaluation's predictions CSV;
  None when the CSV is absent or lacks an image."""
  name = result.get("predictions_file")
  out_dir = fileio.as_path(evaluation.workdir_of(workdir))
  path = (
    out_dir / name if name else evaluation.predictions_path_for(out_dir / "evaluation_test.json")
  )
  if not path.is_file():
    return None
  by_id = engine.read_predictions_csv(path)
  try:
    return np.stack([by_id[index.image_ids[r]] for r in rows]) if len(rows) else None
  except KeyError:
    return None


def _fill_iobb(
  result: dict, saliency: dict | None, index, taus_needed: Sequence[float], classes
) -> None:
  """Adds IoBB accuracies at taus the stored evaluation lacks, from its saliency maps
  (`classes`: the run's, the maps' channels)."""
  have = {float(t) for by_tau in result.get("iobb", {}).values() for t in by_tau}
  missing = sorted({float(t) for t in taus_needed} - have)
  if not missing or saliency is None:
    return
  loc = evaluation.localization_metrics(
    saliency["maps"], evaluation.box_cases(index, saliency["maps"]), index.box_space,
    classes=classes, taus=missing,
  )  # fmt: skip
  for cls, by_tau in loc["iobb"].items():
    result.setdefault("iobb", {}).setdefault(cls, {}).update(by_tau)


def name_runs(runs: Sequence[Run]) -> None:
  """Sets each run's display name: the label alone, or 'label (seed s)' within a group."""
  by_label: dict[str, list[Run]] = {}
  for r in runs:
    by_label.setdefault(r.label, []).append(r)
  for group in by_label.values():
    seeds = [r.seed for r in group]
    for i, r in enumerate(group):
      if len(group) == 1:
        r.name = r.label
      elif len(set(seeds)) == len(seeds):
        r.name = f"{r.label} (seed {r.seed})"
      else:
        r.name = f"{r.label} (run {i + 1})"


def groups_of(runs: Sequence[Run]) -> dict[str, list[Run]]:
  """{label: its runs} in first-appearance order."""
  out: dict[str, list[Run]] = {}
  for r in runs:
    out.setdefault(r.label, []).append(r)
  return out


# --------------------------------------------------------------------------- statistics


def _mean_by_key(dicts: Sequence[dict]) -> tuple[dict, dict]:
  """Per-key mean and sd (ddof 1) of several {key: number} dicts (keys of the first)."""
  mean, sd = {}, {}
  for k in dicts[0]:
    vals = [float(np.nan if d.get(k) is None else d[k]) for d in dicts]
    mean[k] = float(np.mean(vals))
    sd[k] = float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan
  return mean, sd


def mean_dice_of(result: dict) -> float:
  """A run's mean DICE over the box classes with a value (Table 3's A.V.G. DICE)."""
  vals = [float(v) for v in (result.get("dice") or {}).values() if v is not None]
  vals = [v for v in vals if not math.isnan(v)]
  return float(np.mean(vals)) if vals else math.nan


def group_result(label: str, results: Sequence[dict]) -> dict:
  """One Table 2/3 entry of a label: the run itself, or over several runs (seeds) the mean of
  AUC / DICE / IoBB per class with sds ('auc_sd', 'dice_sd', 'mean_auc_sd'; no CI)."""
  first = dict(results[0], label=label, n_seeds=len(results))
  if len(results) == 1:
    return first
  for key in ("auc_lo", "auc_hi"):
    first.pop(key, None)
  first["auc"], first["auc_sd"] = _mean_by_key([r["auc"] for r in results])
  first["dice"], first["dice_sd"] = _mean_by_key([r.get("dice") or {} for r in results])
  means = [float(r["mean_auc"]) for r in results]
  first["mean_auc"], first["mean_auc_sd"] = float(np.mean(means)), float(np.std(means, ddof=1))
  iobb = {}
  for cls in results[0].get("iobb") or {}:
    iobb[cls] = _mean_by_key([(r.get("iobb") or {}).get(cls, {}) for r in results])[0]
  first["iobb"] = iobb
  return first


def case_dice(saliency: dict, cases: dict, box_space: float) -> dict[tuple[int, int], float]:
  """{(row, class): continuous DICE at 512 x 512} of every box case with a kept map (Table
  3's per-case values; their mean per class is the evaluation's DICE)."""
  out = {}
  for row, by_cls in cases.items():
    m = saliency["maps"].get(row)
    if m is None:
      continue
    for k, boxes in by_cls:
      out[(row, k)] = overlap.box_dice(m[..., k], boxes, evaluation.EVAL_SIZE, box_space)
  return out


def table3_significance(
  groups: dict[str, list[Run]], index, rows: np.ndarray, dice_by_run: dict[str, dict], classes
) -> dict | None:
  """`significance.compare_runs` over the labels (None for fewer than two with probabilities).

  A label with several runs enters with its seed-averaged probabilities and per-case DICE.
  """
  names = [lb for lb, g in groups.items() if all(r.probs is not None for r in g)]
  if len(names) < 2:
    return None
  labels = np.asarray(index.labels, np.float64)[rows]
  scores = [np.mean([r.probs for r in groups[lb]], axis=0) for lb in names]
  kw = {}
  members = [r for lb in names for r in groups[lb]]
  if all(r.name in dice_by_run for r in members):
    common = sorted(set.intersection(*(set(dice_by_run[r.name]) for r in members)))
    if common:
      kw["dice"] = [
        np.array([np.mean([dice_by_run[r.name][c] for r in groups[lb]]) for c in common])
        for lb in names
      ]
      kw["dice_patients"] = np.asarray(index.patient_ids)[[r for r, _ in common]]
      kw["dice_classes"] = [classes[k] for _, k in common]
  return significance.compare_runs(names, labels, scores, list(classes), n_boot=SIG_N_BOOT, **kw)


def calibration_entry(run: Run, labels: np.ndarray) -> dict | None:
  """{'label', 'calibration', 'calibration_fitted'?, 'method'?, 'fitted_probs'?} of a run:
  the evaluation's 'calibration' when present, else computed from its probabilities."""
  raw = run.result.get("calibration")
  if raw is None and run.probs is None:
    return None
  if raw is None:
    raw = calibration.calibration_metrics(run.probs, labels, findings.of_config(run.config))
  entry = {"label": run.name, "calibration": raw}
  fitted, name = run.result.get("calibration_fitted"), run.result.get("calibration_file")
  if isinstance(fitted, dict):
    entry["calibration_fitted"] = fitted
    path = fileio.as_path(evaluation.workdir_of(run.workdir)) / name if name else None
    if path is not None and path.is_file():
      params = fileio.read_json(path)
      entry["method"] = params.get("method")
      if run.probs is not None:
        entry["fitted_probs"] = calibration.apply(params, run.probs)
  return entry


# --------------------------------------------------------------------------- Table 4


def table4(
  runs: Sequence[Run], index, split: str, n_boot: int
) -> tuple[dict, dict[str, dict], list[str], dict[str, dict]]:
  """(table4_rows result, {source: protocols}, sources left out for lack of 'protocols',
  {source: `scoring.score` result}) for the labels' first runs, the baselines, the constant
  map and the centre prior. The cheXlocalize columns are `lsemil score`'s
  (`truth_scoring.nih_scores` on the stored maps: one scoring path); the others are the
  evaluation's `localization.score_all` (the model-free sources scored here with the runs'
  settings)."""
  by_source, missing, settings = {}, [], None
  for r in runs:
    protocols = r.result.get("protocols")
    if protocols is None:
      missing.append(r.name)
      continue
    by_source[r.name] = dict(protocols)
    settings = settings or protocols.get("settings")
  cases = localization.make_cases(evaluation.box_cases(index, index.rows(split)), index.patient_ids)
  kw = {"n_boot": n_boot}
  if settings:
    kw = {k: settings[k] for k in ("size", "taus", "ts", "thresholds", "n_boot", "seed")}
    kw["method"] = settings.get("method", "nearest")
  maps = {
    "constant": baselines.constant_maps(cases, index.box_space, size=kw.get("size", 512)),
    "centre": baselines.centre_prior_maps(cases),
  }
  for name, m in maps.items():
    by_source[name] = localization.score_all(
      cases, m, index.box_space, image_ids=index.image_ids,
      class_names=findings.of_config(runs[0].config) if runs else None, **kw,
    )  # fmt: skip
  scored = truth_scoring.nih_scores(runs, index, split, n_boot) if runs else {}
  for name, res in scored.items():
    official = {p: v for p, v in res.items() if p.startswith("chexlocalize_")}
    by_source[name] = {**by_source.get(name, {}), **official}
  return paper_tables.table4_rows(by_source), by_source, missing, scored


def source_tables(inp: Inputs, out_dir, n_boot: int) -> tuple[dict, dict]:
  """Table 4 (cheXlocalize's protocols) and, for box truth, the WSRPN-style table of every
  `Inputs.extra_truth` source: R/table4_<source>.md/.csv, R/table_wsrpn_<source>.md/.csv.
  Returns (texts, data)."""
  shown = [g[0] for g in groups_of(inp.runs).values()] + list(inp.baselines)
  texts, data = {}, {}
  for source, data_dir in inp.extra_truth:
    scored, mapping = truth_scoring.source_scores(
      shown, source, data_dir, inp.split, n_boot, which=inp.which
    )
    pairs = ", ".join(f"{p['model']} = {p['data']}" for p in mapping.get("pairs", ()))
    t4 = paper_tables.table4_rows(scored, paper_tables.TABLE4_SOURCE_PROTOCOLS)
    texts[f"table4_{source}"] = _write(
      out_dir, f"table4_{source}", (t4["markdown"], t4["csv"]),
      f"**Table 4 ({source}, {data_dir}).** cheXlocalize's protocols (its official code, "
      f"`lsemil score`) on the {inp.split} images with a {source} box or mask, each run class "
      f"scored as its data class ({pairs}); value (95% image-bootstrap interval); best in "
      "bold; _all and _cutoff: over every such image, the finding's or not.",
    )  # fmt: skip
    data[source] = {"data_dir": str(data_dir), "mapping": mapping, "rows": t4["rows"],
                    "results": {n: {k: v for k, v in r.items() if k != "per_image"}
                                for n, r in scored.items()}}  # fmt: skip
    if any("detection_ap@0.3" in r for r in scored.values()):
      texts[f"table_wsrpn_{source}"] = _write(
        out_dir, f"table_wsrpn_{source}", paper_tables.wsrpn_table(scored),
        _wsrpn_caption(f"the {inp.split} images with a {source} box"),
      )  # fmt: skip
  return texts, data


def _wsrpn_caption(images: str) -> str:
  return (
    f"**WSRPN-style table** (Müller et al. 2024) on {images}: `lsemil score`'s detection "
    "family (the boxes of `predict --boxes` at tau 0.5, score = peak x probability, classes "
    "with probability > 0.5; the model-free maps take the first run's probabilities). RoDeO "
    "pooled over classes "
    "('-': it needs two classes or more), AP (COCO 101-point) and loc-acc the class mean "
    "(loc-acc counts a class without a box on an image without it as correct, so the "
    "constant map, which has no box, scores there); fractions (WSRPN prints percent); the "
    "mean of image-bootstrap replicates (2.5-97.5%)."
  )


# --------------------------------------------------------------------------- figures


def _save_figure(out_dir, name: str, draw) -> None:
  """Renders a figure with `draw(local_path)` into a temp folder, then copies it to out_dir
  (which may be gs://; matplotlib writes local files only)."""
  with tempfile.TemporaryDirectory() as tmp:
    local = Path(tmp) / name
    draw(local)
    fileio.write_bytes(out_dir / name, local.read_bytes())


class Images:
  """Stored test images by row, from the saliency files' figure images or the dataset."""

  def __init__(self, runs: Sequence[Run], config, data_dir, split: str):
    self.config, self.data_dir, self.split = config, data_dir, split
    self.cache: dict[int, np.ndarray] = {}
    for r in runs:
      for row, _, img, _ in (r.saliency or {}).get("figure", []):
        self.cache.setdefault(row, img)

  def get(self, rows: Sequence[int]) -> list[np.ndarray]:
    need = [r for r in dict.fromkeys(rows) if r not in self.cache]
    if need:
      imgs = evaluation.stored_images(self.config, self.data_dir, self.split, need)
      self.cache.update(zip(need, imgs, strict=True))
    return [self.cache[r] for r in rows]


def figure3_cases(
  index, split, shown: Sequence[Run], n_figure: int, images: Images, classes
) -> list:
  picks = evaluation.figure_cases(index, split, n_figure)
  boxes_of = evaluation.box_cases(index, [r for r, _ in picks])
  cases = []
  for (row, k), img in zip(picks, images.get([r for r, _ in picks]), strict=True):
    sal = {}
    for run in shown:
      m = (run.saliency or {}).get("maps", {}).get(row)
      if m is not None:
        sal[run.name] = m[..., k]
    cases.append(
      {
        "image": img,
        "boxes": dict(boxes_of.get(row, []))[k],
        "source_size": float(index.box_space),
        "finding": classes[k],
        "saliency": sal,
      }
    )
  return cases


def figure_levels(path: Path, runs: Sequence[Run]) -> bool:
  """One model's saliency at each level of its up path, coarse to fine (the run labelled
  r0=5, else the first with level maps). Not the paper's Figure 1 (see `figure1`)."""
  order = sorted(runs, key=lambda r: r.label != "r0=5")
  for run in order:
    fig = (run.saliency or {}).get("figure") or []
    if fig and len(fig[0][3]) > 1:
      _, k, img, levels = fig[0]
      named = [(f"{run.name} level {i}", lv[..., k]) for i, lv in enumerate(levels)]
      title = f"image ({paper_tables.display_class(findings.of_config(run.config)[k])})"
      drawing.figure1(path, img, named, title=title)
      return True
  return False


def figure1_case(index, split, runs: Sequence[Run]) -> tuple[int, int] | None:
  """The (row, box class) of Figure 1: the first Figure 3 pick every model has a map of."""
  common = set.intersection(*(set((r.saliency or {}).get("maps", {})) for r in runs))
  if not common:
    return None
  for row, k in evaluation.figure_cases(index, split, 64):
    if row in common:
      return row, k
  return None


def figure1(path: Path, runs: Sequence[tuple[int, Run]], index, split, images: Images) -> dict:
  """The paper's Figure 1: one image and class, the map of each model at its own N."""
  case = figure1_case(index, split, [r for _, r in runs])
  if case is None:
    raise UserError("--figure1: the runs share no test image with boxes")
  row, k = case
  (img,) = images.get([row])
  panels = [
    (f"N={n}", r.saliency["maps"][row][..., k]) for n, r in sorted(runs, key=lambda x: x[0])
  ]
  boxes = dict(evaluation.box_cases(index, [row])[row])[k]
  name = findings.of_config(runs[0][1].config)[k]
  cls = paper_tables.display_class(name)
  drawing.figure1(path, img, panels, title=cls, boxes=boxes, source_size=float(index.box_space))
  return {"row": int(row), "image_id": index.image_ids[row], "class": name,
          "N": [int(n) for n, _ in sorted(runs, key=lambda x: x[0])]}  # fmt: skip


def gallery(
  index, split, shown: Sequence[Run], dice_by_run: dict, images: Images, classes
) -> list:
  """One card per test box case (image, class): ground truth and each shown run's map."""
  cases = evaluation.box_cases(index, index.rows(split))
  items = []
  rows = list(cases)
  for row, img in zip(rows, images.get(rows), strict=True):
    for k, boxes in cases[row]:
      sal, dice = {}, {}
      for run in shown:
        m = (run.saliency or {}).get("maps", {}).get(row)
        if m is not None:
          sal[run.name] = m[..., k]
          dice[run.name] = dice_by_run.get(run.name, {}).get((row, k))
      items.append(
        html_page.gallery_item(
          img, boxes, classes[k], sal, dice={n: d for n, d in dice.items() if d is not None},
          source_size=float(index.box_space), caption=index.image_ids[row],
        )
      )  # fmt: skip
  return items


# --------------------------------------------------------------------------- tables


def _write(out_dir, name: str, md_csv: tuple[str, str], caption: str, footer: str = "") -> str:
  md, csv_text = md_csv
  text = f"{caption}\n\n{md}" + (f"\n{footer}\n" if footer else "")
  fileio.write_text(out_dir / f"{name}.md", text)
  fileio.write_text(out_dir / f"{name}.csv", csv_text)
  return text


def sweep_table(
  runs: Sequence[dict], taus: Sequence[float], box_classes: Sequence[str]
) -> tuple[str, str]:
  """IoBB accuracy at T(IoBB) = 0.5 of every run and box class (rows: `box_classes`, the
  classes the data has boxes of) over taus (columns)."""
  header = ["run", "class", *(f"τ={t:g}" for t in taus)]
  md_rows, csv_rows = [], []
  for run in runs:
    table = {paper_tables.canonical_class(k): v for k, v in (run.get("iobb") or {}).items()}
    for cls in box_classes:
      by_tau = {float(k): v for k, v in table.get(cls, {}).items()}
      vals = [by_tau.get(float(t)) for t in taus]
      md_rows.append(
        [run["label"], paper_tables.display_class(cls)]
        + ["-" if v is None or math.isnan(v) else f"{v:.4f}" for v in vals]
      )
      csv_rows.append(
        [run["label"], cls] + ["" if v is None or math.isnan(v) else repr(v) for v in vals]
      )
  csv_header = ["run", "class", *(f"tau={t:g}" for t in taus)]
  return tables.markdown(header, md_rows), tables.csv_text(csv_header, csv_rows)


def _paper_numbers() -> dict:
  return {
    "auc": paper_tables.PAPER_AUC,
    "mean_auc": paper_tables.PAPER_MEAN_AUC,
    "dice": paper_tables.PAPER_DICE,
    "iobb": {
      r: {c: {evaluation.tau_key(t): v for t, v in d.items()} for c, d in by.items()}
      for r, by in paper_tables.PAPER_IOBB.items()
    },
    "iobb_wang": paper_tables.PAPER_IOBB_WANG,
  }


def _unique_by_workdir(runs: Sequence[Run]) -> list[Run]:
  """One run per (workdir, checkpoint): a GAP run given as gradcam and cam has one set of
  probabilities."""
  seen, out = set(), []
  for r in runs:
    key = (r.workdir, r.result.get("step"))
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out


@dataclasses.dataclass
class Inputs:
  """What `reproduce_results` draws from: evaluated runs on one dataset and split."""

  runs: Sequence[Run]  # the MIL runs (Tables 1-3), grouped by label
  index: Any  # the dataset's `NihIndex`
  split: str = "test"
  baselines: Sequence[Run] = ()  # GAP runs with their post-hoc source (Table 4, ROC, gallery)
  figure1: Sequence[tuple[int, Run]] = ()  # (N, run) of the paper's Figure 1
  config: Any = None  # to read images the saliency files lack
  data_dir: Any = None
  extra_truth: Sequence[tuple[str, Any]] = ()  # (source, folder): Table 4 on its truth too
  which: str = "best"  # the checkpoints the extra truth's maps come from

  @property
  def classes(self) -> tuple[str, ...]:
    """The runs' classes (their checkpoints' configs: `findings.of_config`)."""
    return findings.of_config(self.runs[0].config)

  @property
  def box_classes(self) -> list[str]:
    """The classes the data has boxes of (NIH: 8 of 14), in class order."""
    return [self.classes[k] for k in sorted(set(self.index.box_classes.tolist()))]


def _tables(inp: Inputs, out_dir, classes_taus, n_boot: int) -> tuple[dict, dict, dict, list]:
  """Writes Tables 1-4, spread and calibration; returns (texts, data, per-case DICE by run
  name, calibration entries)."""
  from lsemil.data import statistics

  index, runs = inp.index, list(inp.runs)
  groups = groups_of(runs)
  rows = index.rows(inp.split)
  labels = np.asarray(index.labels, np.float64)[rows]
  grouped = [group_result(lb, [r.result for r in g]) for lb, g in groups.items()]
  texts, data = {}, {"table1": statistics.table1(index)}
  texts["table1"] = _write(
    out_dir, "table1", paper_tables.table1(data["table1"]),
    f"**Table 1.** Positive images per class in each split and boxes per class "
    f"({index.kind} data at {index.root}); the paper's numbers beside ours.",
  )  # fmt: skip
  texts["table2"] = _write(
    out_dir, "table2", paper_tables.table2(grouped, classes_taus),
    "**Table 2.** Localization accuracy at T(IoBB) = 0.5 for binarization thresholds τ"
    + (" (mean over a label's seeds)." if len(grouped) < len(runs) else "."),
  )  # fmt: skip
  sweep_taus = sorted({float(t) for r in grouped for t in r.get("taus", [])}) or list(
    evaluation.DEFAULT_TAUS
  )
  texts["table2_sweep"] = _write(
    out_dir, "table2_sweep", sweep_table(grouped, sweep_taus, inp.box_classes),
    "**Table 2 (all box classes).** IoBB accuracy at T(IoBB) = 0.5 over the τ sweep; one row "
    "per run and box class ('-': no test box of the class).",
  )  # fmt: skip
  cases = evaluation.box_cases(index, rows)
  dice_by_run = {
    r.name: case_dice(r.saliency, cases, index.box_space)
    for r in [*runs, *inp.baselines]
    if r.saliency
  }
  sig = table3_significance(groups, index, rows, dice_by_run, inp.classes)
  data["significance"] = sig
  seeds_note = (
    " A label with several runs shows mean ± sd over its seeds (its tests: the seed-averaged "
    "probabilities and per-case DICE)."
    if len(grouped) < len(runs)
    else ""
  )
  rule = (
    (significance.BOLD_RULE + " The A.V.G. row is not tested.")
    if sig
    else ("Bold: the best of our runs per row (one label: nothing to test).")
  )
  texts["table3"] = _write(
    out_dir, "table3", paper_tables.table3(grouped, sig),
    f"**Table 3.** AUC of the {len(inp.classes)} classes (95% patient-bootstrap CI) and DICE "
    f"of the {len(inp.box_classes)} box classes." + seeds_note, footer=rule,
  )  # fmt: skip
  if sig:
    fileio.write_json(out_dir / "significance.json", sig)
  spread = [
    {"label": lb, "seeds": [
      {"seed": r.seed, "workdir": r.workdir, "mean_auc": float(r.result["mean_auc"]),
       "mean_dice": mean_dice_of(r.result)} for r in g]}
    for lb, g in groups.items()
  ]  # fmt: skip
  data["spread"] = spread
  texts["spread"] = _write(
    out_dir, "spread", paper_tables.spread_table(spread),
    f"**Spread over seeds.** Test mean AUC ({len(inp.classes)} classes) and mean DICE "
    f"({len(inp.box_classes)} box classes) of every run: mean ± sd (ddof 1) over a label's "
    "seeds and each seed's value.",
  )  # fmt: skip
  calib = [
    e for r in _unique_by_workdir([*runs, *inp.baselines]) if (e := calibration_entry(r, labels))
  ]
  data["calibration"] = [{k: v for k, v in e.items() if k != "fitted_probs"} for e in calib]
  if calib:
    texts["calibration"] = _write(
      out_dir, "calibration", paper_tables.calibration_table(calib),
      "**Calibration.** Expected calibration error (15 equal-mass bins) and Brier score of "
      f"the test probabilities, pooled over the {len(inp.classes)} classes (per class in the "
      "CSV); 'fitted': "
      "after the evaluation's recalibration fitted on the validation split.",
    )  # fmt: skip
  shown = [g[0] for g in groups.values()] + list(inp.baselines)
  t4, by_source, missing, scored = table4(shown, index, inp.split, n_boot)
  data["table4"] = {"rows": t4["rows"], "results": by_source, "not_scored": missing}
  data["wsrpn"] = {name: {p: v for p, v in res.items() if p.startswith("detection_")}
                   for name, res in scored.items()}  # fmt: skip
  note = (
    f" Not scored (the evaluation has no 'protocols'; re-run `lsemil evaluate`): "
    f"{', '.join(missing)}."
    if missing
    else ""
  )
  texts["table4"] = _write(
    out_dir, "table4", (t4["markdown"], t4["csv"]),
    "**Table 4.** Weak localization by protocol: cheXlocalize's first, as its official code "
    "computes them (`lsemil score` on the stored maps and the boxes, box-space pixels: "
    "value = the mean of eval.py's image-bootstrap replicates, their 2.5/97.5% points), then "
    "`lsemil.metrics.localization`'s (95% patient-bootstrap interval); best source per class "
    "and protocol in bold (lowest for afp_*). Sources: each label's first run, the GAP "
    "baselines' Grad-CAM / CAM, the best constant map (an oracle of the box area; under "
    "cheXlocalize's min-max scaling any constant predicts nothing) and a centre prior." + note,
  )  # fmt: skip
  if scored:
    texts["table_wsrpn"] = _write(
      out_dir, "table_wsrpn", paper_tables.wsrpn_table(scored),
      _wsrpn_caption(f"the {inp.split} images with boxes"),
    )  # fmt: skip
  more, data["table4_sources"] = source_tables(inp, out_dir, n_boot)
  texts.update(more)
  return texts, data, dice_by_run, calib


def _figures(inp: Inputs, out_dir, n_figure: int, dice_by_run: dict, calib: list) -> tuple:
  """Writes the PNG figures and the gallery items; returns ([(name, caption)], gallery, info)."""
  index, runs = inp.index, list(inp.runs)
  groups = groups_of(runs)
  shown = [g[0] for g in groups.values()] + list(inp.baselines)
  rows = index.rows(inp.split)
  labels = np.asarray(index.labels, np.float64)[rows]
  images = Images([*runs, *inp.baselines, *(r for _, r in inp.figure1)], inp.config,
                  inp.data_dir, inp.split)  # fmt: skip
  figures, info = [], {}
  if inp.figure1:
    _save_figure(
      out_dir,
      "figure1.png",
      lambda p: info.update(figure1=figure1(p, inp.figure1, index, inp.split, images)),
    )
    figures.append(("figure1.png", "Figure 1: one image and class, the saliency of models "
                    "trained at target resolutions N, each at its own N."))  # fmt: skip
  cases = figure3_cases(index, inp.split, shown, n_figure, images, inp.classes) if n_figure else []
  info["figure3_cases"] = [{"finding": c["finding"], "runs": sorted(c["saliency"])} for c in cases]
  if cases:
    _save_figure(
      out_dir, "figure3.png", lambda p: drawing.figure3(p, cases, [r.name for r in shown])
    )
    figures.append(("figure3.png", "Figure 3: image, ground-truth box, each run's saliency "
                    "with its DICE."))  # fmt: skip
  drawn = {}
  _save_figure(out_dir, "figure_levels.png", lambda p: drawn.update(ok=figure_levels(p, runs)))
  if drawn.get("ok"):
    figures.append(
      (
        "figure_levels.png",
        "One model's saliency at each level of its up path "
        "(the shared head on coarser levels, which the loss does not see).",
      )
    )
  else:
    (fileio.as_path(out_dir) / "figure_levels.png").unlink(missing_ok=True)
  with_probs = [r for r in _unique_by_workdir([*runs, *inp.baselines]) if r.probs is not None]
  if with_probs and len(labels):
    roc = [(r.name, r.probs) for r in with_probs]
    _save_figure(
      out_dir, "roc_curves.png", lambda p: plots.roc_curves(p, labels, roc, inp.classes)
    )
    figures.append(("roc_curves.png", "ROC curves per class, every run (AUC in the legend)."))
  if calib and len(labels):
    probs = {r.name: r.probs for r in with_probs}
    rel = [(e["label"], probs[e["label"]]) for e in calib if e["label"] in probs]
    fitted = {e["label"]: e["fitted_probs"] for e in calib if "fitted_probs" in e}
    if rel:
      _save_figure(
        out_dir,
        "reliability.png",
        lambda p: plots.reliability_diagrams(p, labels, rel, fitted=fitted),
      )
      figures.append(
        (
          "reliability.png",
          "Reliability diagrams (15 equal-mass bins, pooled "
          "over classes): observed frequency against mean predicted probability.",
        )
      )
  items = gallery(index, inp.split, shown, dice_by_run, images, inp.classes)
  return figures, items, info


def reproduce_results(
  inp: Inputs,
  out_dir,
  *,
  classes_taus: Sequence[tuple[str, Sequence[float]]] = paper_tables.DEFAULT_CLASSES_TAUS,
  n_figure: int = evaluation.FIGURE_CASES,
  n_boot: int = evaluation.DEFAULT_N_BOOT,
  html: bool = True,
) -> dict:
  """Tables, figures and the HTML report of evaluated runs; returns the summary dict (also
  R/summary.json). n_boot: resamples of Table 4's intervals for the model-free sources when
  no run gives its protocol settings."""
  out_dir = fileio.as_path(out_dir)
  if not inp.runs:
    raise UserError("reproduce needs at least one run")
  names = [r.name for r in [*inp.runs, *inp.baselines]]
  if len(set(names)) != len(names):
    raise UserError(f"run names must differ, got {names}")
  needed = [t for _, taus in classes_taus for t in taus]
  for r in inp.runs:
    _fill_iobb(r.result, r.saliency, inp.index, needed, findings.of_config(r.config))
  texts, data, dice_by_run, calib = _tables(inp, out_dir, classes_taus, n_boot)
  figures, items, info = _figures(inp, out_dir, n_figure, dice_by_run, calib)
  labels = list(groups_of(inp.runs))
  md = ["# Reproduction of Yao et al. 2018 (Tables 1-4, Figures 1 and 3)", ""]
  md += [f"Runs: {', '.join(r.name for r in inp.runs)}; split {inp.split!r}; "
         f"data {inp.index.root}.", ""]  # fmt: skip
  order = ("table1", "table2", "table3", "spread", "calibration", "table4", "table_wsrpn",
           *(k for k in texts if k.startswith(("table4_", "table_wsrpn_"))), "table2_sweep")
  md += [x for name in order if name in texts for x in (texts[name], "")]
  md += [f"![{f}]({f})" for f, _ in figures]
  fileio.write_text(out_dir / "report.md", "\n".join(md) + "\n")
  page = None
  if html:
    page = html_page.write_report(
      out_dir,
      title="lsemil: reproduction of Yao et al. 2018",
      intro=f"Runs: {', '.join(names)}; split `{inp.split}`; data `{inp.index.root}`.",
      tables=[(name, texts[name]) for name in order if name in texts],
      figures=[(caption, out_dir / f) for f, caption in figures],
      gallery=items,
    )
  summary = {
    "split": inp.split,
    "data_dir": str(inp.index.root),
    "labels": labels,
    "runs": [dict(r.result, name=r.name, seed=r.seed) for r in inp.runs],
    "baselines": [dict(r.result, name=r.name) for r in inp.baselines],
    "classes_taus": [[c, list(t)] for c, t in classes_taus],
    "figures": [f for f, _ in figures],
    "tables": texts,
    "gallery_items": len(items),
    "index_html": str(page) if page is not None else None,
    "paper": _paper_numbers(),
    **info,
    **data,
  }
  fileio.write_json(out_dir / "summary.json", fileio.json_safe(summary))
  return summary


def _load_run(label, r0, workdir, data_dir, *, source=None, **kw) -> Run:
  result, saliency, config = load_or_evaluate(workdir, data_dir, source=source, **kw)
  result = dict(result, label=str(label), workdir=str(workdir))
  if r0 is not None:
    result["r0"] = float(r0)
  src = result.get("saliency_source", "model")
  return Run(str(label), r0, str(workdir), result, saliency, config, None, src)


def reproduce_runs(
  runs: Sequence[tuple[str, float | None, Any]],
  data_dir,
  out_dir,
  *,
  split: str = "test",
  which: str = "best",
  classes_taus: Sequence[tuple[str, Sequence[float]]] = paper_tables.DEFAULT_CLASSES_TAUS,
  n_figure: int = evaluation.FIGURE_CASES,
  n_boot: int = evaluation.DEFAULT_N_BOOT,
  force: bool = False,
  progress: log.Progress | None = None,
  baselines: Sequence[tuple[str, Any]] = (),
  figure1: Sequence[tuple[int, Any]] = (),
  html: bool = True,
  calibrate: str | None = None,
  extra_truth: Sequence[tuple[str, Any]] = (),
) -> dict:
  """The Python API of `lsemil reproduce`.

  runs: [(label, r0 or None, workdir)]; runs sharing a label are seeds of one group. A run
  whose config is the GAP classifier (`configs/baseline_gap.py`) goes to the baselines with
  its config's saliency source. baselines: [(source 'gradcam' | 'cam', workdir)].
  figure1: [(N, workdir)], one model per target resolution N. calibrate: 'temperature' |
  'platt' has each evaluation fit a recalibration on the valid split (raw and fitted are
  reported). extra_truth: [(source, folder)]: Table 4 (and for boxes the WSRPN-style table)
  also on that source's truth (`truth_scoring.source_scores`). data_dir None uses the first
  run's `config.data.data_dir`. Returns the summary dict.
  """
  import jax

  for source, folder in extra_truth:
    if source not in sources.READERS or not fileio.as_path(folder).is_dir():
      raise UserError(f"--extra-truth {source}={folder}: a source of {', '.join(sources.READERS)}"
                      " and an existing folder")
  kw = {"split": split, "which": which, "n_boot": n_boot, "force": force, "progress": progress}
  kw["calibrate"] = calibrate
  loaded: list[Run] = []
  for label, r0, workdir in runs:
    loaded.append(_load_run(label, r0, workdir, data_dir, **kw))
    data_dir = data_dir or evaluation.resolve_data_dir(loaded[-1].config, None)
  for source, workdir in baselines:
    if source not in BASELINE_SOURCES:
      raise UserError(f"--baseline {source}:{workdir}: source must be one of {BASELINE_SOURCES}")
    loaded.append(_load_run(source, None, workdir, data_dir, source=source, **kw))
  mil = [r for r in loaded if r.source == "model"]
  base = [r for r in loaded if r.source != "model"]
  for r in base:
    r.label = r.result["label"] = r.source if r.label == r.workdir else r.label
  fig1 = [(int(n), _load_run(f"N={n}", None, w, data_dir, **kw)) for n, w in figure1]
  if not mil:
    raise UserError("reproduce needs at least one MIL run (--run)")
  classes = findings.of_config(mil[0].config)
  for r in [*loaded, *(r for _, r in fig1)]:
    if findings.of_config(r.config) != classes:
      raise UserError(f"{r.workdir}: its classes ({', '.join(findings.of_config(r.config))}) "
                      f"are not those of {mil[0].workdir} ({', '.join(classes)})")
  data_dir = evaluation.resolve_data_dir(mil[0].config, data_dir)
  index = evaluation.open_index(mil[0].config, data_dir)
  rows = index.rows(split)
  for r in [*mil, *base]:
    r.probs = split_probs(r.workdir, r.result, index, rows)
  name_runs(mil)
  for r in base:
    r.name = r.label
  for _, r in fig1:
    r.name = r.label
  if jax.process_index() != 0:  # only process 0 writes
    return {"labels": list(groups_of(mil)), "runs": [r.result for r in mil]}
  inp = Inputs(mil, index, split, base, fig1, mil[0].config, data_dir, extra_truth, which)
  return reproduce_results(
    inp, out_dir, classes_taus=classes_taus, n_figure=n_figure, n_boot=n_boot, html=html
  )
