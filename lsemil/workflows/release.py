"""A trained run as a self-contained folder anyone can load (`lsemil export`).

`export(workdir, out)` loads the workdir's best (or latest) checkpoint through
`lsemil.inference.engine.load`, which refuses non-finite weights and weights whose bytes differ
from their checksums (`lsemil.runtime.integrity`) with one CheckpointError, and writes:

  OUT/model.safetensors   every variable, flattened names (`lsemil.runtime.bundle`)
  OUT/config.json         the model config, the class list, the run config, step, source
  OUT/preprocessing.json  the input contract (`preprocessing`): decoding to 8-bit grey (PNG,
                          JPEG, 16-bit, RGB, DICOM windowing), resizing, dtype, layout, scaling
  OUT/model.onnx          the forward as ONNX (`lsemil.inference.onnx_graph`), unless onnx=False
  OUT/calibration.json    the recalibration `lsemil evaluate --calibrate` fitted on the valid
                          split for this step, or {"method": null, "absent": why}
  OUT/thresholds.json     per-class operating thresholds (decision p >= t) `lsemil evaluate
                          --split valid` chose for this step (`--operating-point`), with their
                          valid-split sensitivity and specificity, or {"thresholds": null,
                          "absent": why}
  OUT/metrics.json        {split: the last `lsemil evaluate` of the split (W/evaluation_<split>
                          .json) for the exported step}; {} when there is none
  OUT/README.md           a Hugging Face model card (`lsemil.reporting.model_card`)

The folder is what `engine.load`, `lsemil.load` and `lsemil predict --checkpoint OUT` read.
Writing into a folder that holds other files than these is refused (OutputError).
"""

from __future__ import annotations

import os
from typing import Any

from lsemil.core import fileio, log
from lsemil.core.errors import OutputError
from lsemil.data import dicom, findings, imageio, nih
from lsemil.inference import engine, onnx_graph
from lsemil.reporting import model_card
from lsemil.runtime import bundle
from lsemil.workflows import evaluation

PREPROCESSING_FILE = "preprocessing.json"
ONNX_FILE = "model.onnx"
CALIBRATION_FILE = "calibration.json"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
FILES = (
  bundle.WEIGHTS_FILE,
  bundle.CONFIG_FILE,
  PREPROCESSING_FILE,
  ONNX_FILE,
  CALIBRATION_FILE,
  THRESHOLDS_FILE,
  METRICS_FILE,
  CARD_FILE,
)
DATA_KINDS = ("auto", "nih", "synthetic", "unknown")
# Fields of an evaluation JSON that name files and folders of the exporting machine.
_LOCAL_FIELDS = ("checkpoint", "data_dir", "saliency_file", "predictions_file", "calibration_file")


def preprocessing(input_size: int) -> dict[str, Any]:
  """The input contract of `engine.model_input` (`lsemil.data.pipeline.eval_image`) as data."""
  s = int(input_size)
  return {
    "input": {
      "dtype": "uint8",
      "shape": ["B", s, s, 1],
      "layout": "NHWC",
      "channels": "1, grey (bright = dense, as the NIH PNGs)",
      "scaling": "x / 255 to [0, 1], inside the model and model.onnx; no mean or std normalisation",
    },
    "decode": {
      "grey": "8-bit L kept; LA / RGBA drop alpha; RGB and palette images by ITU-R 601 luma "
      "(cv2 BGR2GRAY)",
      "16_bit": "round(v * 255 / 65535): the full 16-bit range onto 0..255, never clipped",
      "refused": f"sides under {imageio.MIN_SIDE} px, more than {imageio.MAX_PIXELS} pixels, "
      f"files over {imageio.MAX_FILE_BYTES} bytes, truncated or corrupt files",
      "dicom": {
        "suffixes": list(dicom.DICOM_SUFFIXES),
        "also": "any file with 'DICM' at byte 128",
        "rules": [
          "Modality LUT: RescaleSlope and RescaleIntercept (PS3.3 C.11.1); empty = identity",
          "VOI LUT: a VOI LUT Sequence (PS3.3 C.11.2.1.1), else the first WindowCenter / "
          "WindowWidth pair with the LINEAR function (PS3.3 C.11.2.1.2), else a min-max "
          "stretch; onto 0..255",
          "MONOCHROME1 is inverted (bright = dense); PALETTE COLOR through its palette, then "
          "the RGB luma rule",
          "multi-frame: the first frame (lsemil predict --multiframe first) or refused",
        ],
      },
    },
    "resize": [
      f"an image larger than {nih.PREPARED_SIZE} px, or not square, is resized to "
      f"{nih.PREPARED_SIZE} x {nih.PREPARED_SIZE} as skimage.transform.resize with "
      "anti-aliasing (Gaussian prefilter sigma = (factor - 1) / 2, bilinear at pixel centres; "
      "as `lsemil prepare`, Sec 4.2)",
      f"then to {s} x {s}: first cv2.INTER_AREA straight to {s} when that shrinks by more than "
      "2x, then one centre-to-centre affine warp (cv2.INTER_LINEAR, border 0) when the side "
      f"is still not {s}",
    ],
    "aspect_ratio": "not kept: a non-square image is stretched to the square",
    "reference": "lsemil.inference.engine.model_input (uint8 (H, W) -> uint8 (S, S, 1))",
  }


def _evaluations(workdir, step: int) -> tuple[dict[str, dict], list[str]]:
  """({split: evaluation} of the workdir's default evaluate outputs for `step`, notes)."""
  metrics, notes = {}, []
  for split in nih.SPLITS:
    path = evaluation.default_output(workdir, split)
    if not path.exists():
      continue
    ev = evaluation.load_evaluation(path)
    if ev.get("step") != step:
      notes.append(f"{path.name}: evaluates step {ev.get('step')}, not the exported {step}")
      continue
    metrics[split] = ev
  return metrics, notes


def _calibration(workdir, step: int) -> dict[str, Any]:
  """calibration.json: the workdir's `evaluate --calibrate` fit for `step`, or what is absent
  (workdir None: nothing to look in)."""
  found = evaluation.stored_calibration(workdir, step) if workdir is not None else None
  if found is not None:
    params, split = found
    return {
      **params,
      "fitted_on": "valid",
      "written_by": f"lsemil evaluate --split {split} --calibrate {params.get('method')}",
      "apply": "lsemil.metrics.calibration.apply: 'temperature' sigmoid(logit(p) / T_k), "
      "'platt' sigmoid(a_k logit(p) + b_k), per class k in config.json's class order",
    }
  return {
    "method": None,
    "absent": "no recalibration was fitted for this step (`lsemil evaluate --calibrate "
    "temperature` fits one on the valid split); the probabilities are the model's own",
  }


def _thresholds(metrics: dict[str, dict], classes) -> dict[str, Any]:
  ops = (metrics.get("valid") or {}).get("operating_points")
  if ops and any(t is not None for t in ops.get("thresholds") or ()):
    decision = "p >= threshold per class (config.json's class order), on the model's own "
    decision += "probabilities (before any calibration); null: no threshold for that class"
    return {**ops, "decision": decision}
  return {
    "thresholds": None,
    "classes": list(classes),
    "absent": "no operating thresholds for this step: `lsemil evaluate --workdir W --split "
    "valid [--operating-point youden|f1|sens=X|spec=X]` chooses them, then export again",
  }


def _results(loaded: engine.LoadedModel, step: int) -> tuple[dict, dict, dict, list[str]]:
  """(metrics.json, calibration.json, thresholds.json, notes) for the export of `loaded`:
  from its workdir's evaluations of `step` (without the exporting machine's paths), or,
  re-exporting an export, the files that folder carries."""
  classes = findings.of_config(loaded.config)
  if loaded.info.get("which") == "export":
    src = fileio.as_path(loaded.checkpoint)
    found = [
      fileio.read_json(src / name) if (src / name).exists() else None
      for name in (METRICS_FILE, CALIBRATION_FILE, THRESHOLDS_FILE)
    ]
    metrics = found[0] or {}
    thresholds = found[2] or _thresholds(metrics, classes)
    return metrics, found[1] or _calibration(None, step), thresholds, []
  run_dir = evaluation.workdir_of(loaded.checkpoint)
  metrics, notes = _evaluations(run_dir, step)
  public = {
    split: {k: v for k, v in ev.items() if k not in _LOCAL_FIELDS} for split, ev in metrics.items()
  }
  return public, _calibration(run_dir, step), _thresholds(public, classes), notes


def _data_kind(config) -> str:
  """'synthetic' (lsemil synth's phantoms, in any layout), another source's name (its
  release, as its reader reads it), or for NIH 'nih' / 'unknown' (a folder of unknown
  origin)."""
  source = str(config.data.get("source") or "nih")
  other = source if source != "nih" else "unknown"
  data_dir = str(config.data.get("data_dir") or "")
  if not data_dir:
    return "synthetic" if int(config.data.get("synth_patients", 0) or 0) > 0 else other
  if fileio.is_remote(data_dir) or not os.path.isdir(data_dir):
    return other
  marker = nih.read_marker(data_dir)
  prepared = marker.get("kind") == "prepared"
  kind = marker.get("prepared_from", "unknown") if prepared else marker.get("kind")
  if kind == "synthetic" or source != "nih":
    return "synthetic" if kind == "synthetic" else source
  return {"nih": "nih", None: "nih"}.get(kind, "unknown")


def _clean_output(out) -> None:
  out = fileio.as_path(out)
  if out.exists() and not out.is_dir():
    raise OutputError(f"--out {out}: exists and is not a folder")
  if out.is_dir():
    other = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    if other:
      raise OutputError(
        f"--out {out}: holds other files than an export's ({', '.join(other[:3])}); "
        "choose an empty or new folder"
      )


def export(
  workdir: str | os.PathLike,
  *,
  out: str | os.PathLike,
  which: str = "best",
  onnx: bool = True,
  data_kind: str = "auto",
  version: str = "",
) -> dict[str, Any]:
  """Writes the folder of the module docstring; returns a summary: 'out', 'step',
  'checkpoint', 'files' (names written), 'onnx_seconds', 'metrics' (splits), 'notes'.
  `data_kind`: what the model was trained on, for the card ('auto': from the run's data
  folder marker); `version`: lsemil's, recorded in config.json."""
  _clean_output(out)
  loaded = engine.load(workdir, which)
  if onnx:
    onnx_graph.check(loaded)  # before anything is written
  out = fileio.as_path(out)
  step = int(loaded.step)
  # An export re-exported keeps the checkpoint it came from.
  source = loaded.info.get("source") or loaded.checkpoint
  head = bundle.write(
    out, loaded.config, loaded.variables, step=step, source=source, version=version
  )
  fileio.write_json(out / PREPROCESSING_FILE, preprocessing(loaded.model.input_size))
  summary: dict[str, Any] = {"out": str(out), "step": step, "checkpoint": loaded.checkpoint}
  if onnx:
    summary["onnx_seconds"] = onnx_graph.write(loaded, out / ONNX_FILE)
  elif (out / ONNX_FILE).exists():
    (out / ONNX_FILE).unlink()  # an earlier export's graph would not match these weights
  public, cal, thresholds, notes = _results(loaded, step)
  for note in notes:
    log.warning(f"export: {note}; left out of {METRICS_FILE}")
  fileio.write_json(out / CALIBRATION_FILE, cal)
  fileio.write_json(out / THRESHOLDS_FILE, thresholds)
  fileio.write_json(out / METRICS_FILE, public)
  kind = _data_kind(loaded.config) if data_kind == "auto" else data_kind
  cal_note = (
    f"{cal['method']} recalibration fitted on the valid split"
    if cal.get("method")
    else "absent (no recalibration fitted); the file says so"
  )
  text = model_card.card(
    head,
    metrics=public,
    data_kind=kind,
    calibration_note=cal_note,
    thresholds_note=(
      f"per-class thresholds by the {thresholds['rule']} rule, chosen on the valid split"
      if thresholds.get("thresholds")
      else "absent (no `lsemil evaluate --split valid` of this step); the file says so"
    ),
    onnx=onnx,
    thresholds=thresholds,
  )
  fileio.write_text(out / CARD_FILE, text)
  summary.update(
    files=[f for f in FILES if (out / f).exists()], metrics=sorted(public), notes=notes,
    data_kind=kind,
  )  # fmt: skip
  return summary
