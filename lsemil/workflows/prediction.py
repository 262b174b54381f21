"""Prediction for image files: class probabilities and saliency overlays (Sec 3.6, 4.4).

Each image (PNG, JPEG or anything OpenCV reads; DICOM with the `dicom` extra,
`lsemil.data.dicom`) is decoded to 8-bit grey and turned into model input by the one contract
`lsemil.inference.engine.model_input` (exactly as the evaluation pipeline does), then runs through
the one `engine.Predictor`, so a file's probabilities equal `lsemil evaluate`'s for the same
pixels. A file that cannot be read is reported by name and skipped; the others complete.

Outputs (`predict_files` with an output folder): predictions.csv in the per-image format of
every command (`engine.predictions_csv`: image_id = the file name, patient_id empty, one
probability per class of the checkpoint, `lsemil.data.findings.of_config`, then the path
and the classes at or above the threshold), and for every image and class with probability
>= threshold the class's saliency map S over the image as <image>_<class>.png
(`lsemil.reporting.drawing.overlay_png`). With `boxes`, also boxes.json:
{image file name: {class: [{x, y, w, h, peak, mean}]}} for the same (image, class) pairs, the
IoBB protocol's boxes (`lsemil.metrics.localization.boxes_from_map`: the map binarized at `box_tau`,
8-connected components boxed) in the input image's own pixels (x the column, from the top-left
corner of the decoded file, before any resizing). The map is the run's saliency source
('model', or 'gradcam' / 'cam' for a GAP baseline run, `lsemil.models.registry`). With
`calibration` (the parameters `lsemil evaluate --calibrate` writes), the probabilities are
recalibrated (`lsemil.metrics.calibration.apply`) before the threshold and the CSV. With
`thresholds` (the per-class operating points stored with the checkpoint, `stored_thresholds`:
an export's thresholds.json, a workdir's valid evaluation of the step), each row also gets a
decision per class, p >= threshold on the model's own probability (the thresholds were chosen
on it, before any recalibration), as the CSV columns <class>_decision (1, 0, or empty where the
class has no threshold). With `calibrated` (the recalibration stored with the checkpoint,
`stored_calibration`), the CSV also gets <class>_calibrated: the probability recalibrated,
beside the model's own in the class's column. The command is `lsemil.commands.predict`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lsemil.core import fileio, log
from lsemil.core.errors import ConfigError
from lsemil.data import findings
from lsemil.inference import engine, readout, records

# Moved down to `lsemil.inference` (`lsemil.load` reads files and decides the same way); the
# names stay importable from here.
from lsemil.inference.readout import read_image as read_image
from lsemil.metrics import calibration
from lsemil.models import registry

BOXES_FILE = "boxes.json"

stored_calibration = records.model_calibration
stored_thresholds = records.model_thresholds

SHORT = 4  # letters of a class's column head in `format_table`


def short_names(classes: Sequence[str]) -> dict[str, str]:
  """A unique head of at most `SHORT` letters per class for `format_table` (its legend
  spells them out): two letters of each of the first two words ('Pleural Effusion' ->
  'PlEf') or a word's first letters, else its first and last ones, else c<number>."""
  out: dict[str, str] = {}
  for k, c in enumerate(classes):
    words = ["".join(ch for ch in w if ch.isalnum()) for w in c.replace("_", " ").split()]
    words = [w for w in words if w] or ["c"]
    letters = "".join(words)
    first = words[0][:2] + words[1][:2] if len(words) > 1 else letters[:SHORT]
    tries = [first] + [letters[: SHORT - j] + letters[-j:] for j in range(1, SHORT)]
    out[c] = next((t for t in tries if t not in out.values()), f"c{k + 1}")
  return out


def _output_stems(paths: Sequence[str]) -> list[str]:
  """File stems made unique (a numbered prefix where two inputs share a stem)."""
  stems = [Path(p).stem or "image" for p in paths]
  dup = {s for s, n in Counter(stems).items() if n > 1}
  return [f"{i:03d}_{s}" if s in dup else s for i, s in enumerate(stems)]


class Inputs(NamedTuple):
  """The readable files of a list, decoded (`read_files`)."""

  images: np.ndarray  # uint8 (n, S, S, 1) model inputs
  prepared: list[np.ndarray]  # their prepared (<= 512 px) images, for the overlays
  ok: list[int]  # indices into the paths of the files read
  failures: list[tuple[str, str]]  # (path, message)
  shapes: list[tuple[int, int]]  # (H, W) of each decoded file, before any resizing


def read_inputs(paths: Sequence[str], input_size: int, progress: log.Progress | None = None):
  """(model inputs uint8 (n, S, S, 1), their prepared 512 px images, indices of `paths`
  read, failures [(path, message)]): every file on its own, a bad one never stops the rest."""
  return tuple(read_files(paths, input_size, progress))[:4]


def read_files(
  paths: Sequence[str],
  input_size: int,
  progress: log.Progress | None = None,
  multiframe: str = "first",
) -> Inputs:
  """`read_inputs` plus each decoded file's own (H, W), as an `Inputs`; a file that cannot
  be read is reported through `log.warning` and listed in `failures` (`multiframe`: see
  `read_image`)."""
  inputs, prepared, ok, failures, shapes = [], [], [], [], []
  for i, path in log.tracked(enumerate(paths), progress, "read", len(paths)):
    got = readout.read_one(path, input_size, multiframe, True, failures)
    if got is not None:
      inputs.append(got[0])
      prepared.append(got[1])
      shapes.append(got[2])
      ok.append(i)
  s = int(input_size)
  images = np.stack(inputs) if inputs else np.zeros((0, s, s, 1), np.uint8)
  return Inputs(images, prepared, ok, failures, shapes)


def predict_files(
  loaded: engine.LoadedModel,
  paths: Sequence[str],
  out_dir: str | Path | None,
  *,
  threshold: float = 0.5,
  batch_size: int = 16,
  progress: log.Progress | None = None,
  boxes: bool = False,
  box_tau: float = 0.5,
  calibration: Mapping | None = None,
  saliency_source: str | None = None,
  gradcam_level: int | None = None,
  overlays: bool = True,
  multiframe: str = "first",
  thresholds: Sequence[float | None] | None = None,
  calibrated: Mapping | None = None,
) -> tuple[list[dict], list[tuple[str, str]]]:
  """Predicts every readable file; returns (rows, failures).

  rows: [{'path', 'probs': {class: p}, 'overlays': [file names], 'boxes': {class: [box]}}]
  in input order (readable files only; 'boxes' only with `boxes`, for every class with
  p >= threshold, `localization.boxes_from_map` at `box_tau` in the file's own pixels);
  failures: [(path, message)]. With `out_dir`, overlays (one per image and class with
  p >= threshold; `overlays=False` skips them), predictions.csv and, with `boxes`,
  boxes.json are written there. `calibration`: parameters of `calibration.fit` applied to
  the probabilities first. `saliency_source` / `gradcam_level`: None = the run's config.
  `multiframe`: a multi-frame DICOM's 'first' frame (with a warning) or 'refuse' (a failure).

  The files stream through in batches of `batch_size`: no decoded image outlives its batch,
  and predictions.csv gets its header first, then each batch's rows, flushed, so a run
  killed part way keeps every finished batch (a valid CSV prefix).
  """
  from lsemil.reporting import drawing

  classes = findings.of_config(loaded.config)
  for params in (calibration, calibrated):
    if params is not None:
      records.check_calibration(params, classes)
  columns = (thresholds is not None, calibrated is not None)  # to_csv's extra columns
  source, level = registry.saliency_settings(loaded.config, saliency_source, gradcam_level)
  paths = [str(p) for p in paths]
  predictor = engine.Predictor(
    loaded.model, loaded.variables, saliency_source=source, gradcam_level=level
  )
  want_maps = boxes or (out_dir is not None and overlays)
  out_path = Path(fileio.resolve(out_dir)) if out_dir is not None else None
  if out_path is not None:
    out_path.mkdir(parents=True, exist_ok=True)
  stems = _output_stems(paths)
  names = Counter(Path(p).name for p in paths)
  rows, failures, boxes_json = [], [], {}

  def run(batch: list, table) -> None:
    """Predicts one batch [(index, model input, prepared, (H, W))]; rows, overlays, CSV."""
    out = predictor.predict_images(
      np.stack([b[1] for b in batch]), len(batch), saliency=want_maps
    )
    all_probs = np.asarray(out["probs"], np.float64)
    decided = readout.decisions(thresholds, all_probs)  # on the model's own probabilities
    recal = _recalibrate(calibrated, all_probs) if calibrated is not None else None
    if calibration is not None:
      all_probs = _recalibrate(calibration, all_probs)
    new = []
    for j, (i, _, prepared, shape) in enumerate(batch):
      probs = all_probs[j]
      row = {"path": paths[i], "probs": dict(zip(classes, probs.tolist(), strict=True))}
      row["overlays"] = []
      if decided is not None:
        row["decisions"] = dict(zip(classes, decided[j], strict=True))
      if recal is not None:
        row["calibrated"] = dict(zip(classes, recal[j].tolist(), strict=True))
      if boxes:
        row["boxes"] = readout.boxes(out["saliency"][j], probs, classes, threshold, box_tau, shape)
      for k, cls in enumerate(classes):
        if not probs[k] >= threshold:  # NaN never passes
          continue
        if out_path is not None and overlays:
          name = f"{stems[i]}_{cls}.png"
          title = f"{Path(paths[i]).name}: {cls} p={probs[k]:.3f}"
          drawing.overlay_png(
            out_path / name, prepared, out["saliency"][j, ..., k], title=title,
            boxes=[[b[v] for v in "xywh"] for b in row["boxes"][cls]] if boxes else None,
            source_size=shape,  # the boxes are in the file's pixels, drawn on `prepared`
          )  # fmt: skip
          row["overlays"].append(name)
      if boxes:
        boxes_json[_box_key(paths, i, stems, names)] = row["boxes"]
      new.append(row)
    if table is not None:
      table.write(to_csv(new, threshold, classes, *columns).split("\n", 1)[1])  # the rows
      table.flush()
    rows.extend(new)

  size, batch_size = loaded.model.input_size, max(1, int(batch_size))
  keep_prepared = out_path is not None and overlays
  table = open(out_path / "predictions.csv", "w") if out_path is not None else None  # noqa: SIM115
  try:
    if table is not None:
      table.write(to_csv([], threshold, classes, *columns))
      table.flush()
    pending = []
    for i, path in log.tracked(enumerate(paths), progress, "predict", len(paths)):
      got = readout.read_one(path, size, multiframe, keep_prepared, failures)
      if got is not None:
        pending.append((i, *got))
      # the last batch runs inside the loop too, so that the bar's rate covers every forward
      if len(pending) == batch_size or (pending and i == len(paths) - 1):
        run(pending, table)
        pending = []
  finally:
    if table is not None:
      table.close()
  if out_path is not None and boxes:
    fileio.write_json(out_path / BOXES_FILE, boxes_json)
  return rows, failures


def _box_key(paths: Sequence[str], i: int, stems: Sequence[str], names: Counter) -> str:
  """The file name (the CSV's image_id); the unique output stem where two inputs share it
  (`names`: how many inputs have each file name)."""
  name = Path(paths[i]).name
  return name if names[name] == 1 else f"{stems[i]}{Path(paths[i]).suffix}"


def _recalibrate(params: Mapping, probs: np.ndarray) -> np.ndarray:
  # `predict_files` has a `calibration` argument, which hides the module there.
  return calibration.apply(params, probs)


def load_calibration(path: str | Path, classes: Sequence[str]) -> dict:
  """The parameters `lsemil evaluate --calibrate` wrote (F_calibration.json), checked
  against the model's `classes`."""
  params = fileio.read_json(path)
  try:
    records.check_calibration(params, classes)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return params


def to_csv(
  rows: Sequence[dict],
  threshold: float,
  classes: Sequence[str],
  decisions: bool = False,
  calibrated: bool = False,
) -> str:
  """`engine.predictions_csv` over the model's `classes` (image_id = file name, no patient
  id), then the path, the classes at or above the threshold ('|'-joined), with `calibrated`
  <class>_calibrated and with `decisions` <class>_decision."""
  probs = np.array([[r["probs"][c] for c in classes] for r in rows], np.float64)
  above = ["|".join(c for c in classes if r["probs"][c] >= threshold) for r in rows]
  extra = {engine.FIRST_EXTRA: [r["path"] for r in rows], f"classes_p>={threshold:g}": above}
  if calibrated:
    for c in classes:
      extra[f"{c}_calibrated"] = [engine.PROB_FORMAT.format(r["calibrated"][c]) for r in rows]
  if decisions:
    for c in classes:
      cells = [r["decisions"][c] for r in rows]
      extra[f"{c}_decision"] = ["" if v is None else str(int(v)) for v in cells]
  return engine.predictions_csv(
    [Path(r["path"]).name for r in rows],
    [None] * len(rows),
    probs.reshape(len(rows), len(classes)),
    classes,
    extra=extra,
  )


def format_table(rows: Sequence[dict], threshold: float, classes: Sequence[str]) -> str:
  """A plain-text table: one line per image, one column per class (short names, legend)."""
  if not rows:
    return "no readable images"
  names = [Path(r["path"]).name for r in rows]
  short = short_names(classes)
  w = min(max(len(n) for n in names), 40)
  head = f"{'image':<{w}}  " + " ".join(f"{short[c]:>5} " for c in classes)
  lines = [head, "-" * len(head)]
  for n, r in zip(names, rows, strict=True):
    cells = " ".join(
      f"{r['probs'][c]:5.3f}" + ("*" if r["probs"][c] >= threshold else " ") for c in classes
    )
    lines.append(f"{n[-w:]:<{w}}  {cells}")
  legend = ", ".join(f"{short[c]}={c}" for c in classes)
  lines.append(f"* p >= {threshold:g}.  {legend}")
  return "\n".join(line.rstrip() for line in lines)
