"""Prediction for image files: class probabilities and saliency overlays (Sec 3.6, 4.4).

Each image (PNG, JPEG or anything OpenCV reads; DICOM with the `dicom` extra,
`lsemil.data.dicom`) is decoded to 8-bit grey and turned into model input by the one contract
`lsemil.inference.model_input` (exactly as the evaluation pipeline does), then runs through the
one `inference.Predictor`, so a file's probabilities equal `lsemil evaluate`'s for the same
pixels. A file that cannot be read is reported by name and skipped; the others complete.

Outputs (`predict_files` with an output folder): predictions.csv in the per-image format of
every command (`inference.predictions_csv`: image_id = the file name, patient_id empty, the 14
probabilities, then the path and the classes at or above the threshold), and for every image
and class with probability >= threshold the class's saliency map S over the image as
<image>_<class>.png (`lsemil.report.overlay_png`). The command is `lsemil.commands.predict`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from lsemil import fileio, inference
from lsemil.data import dicom, imageio, pipeline
from lsemil.data.nih import CLASSES
from lsemil.errors import UserError

SHORT_NAMES = {
  "Atelectasis": "Atel",
  "Cardiomegaly": "Card",
  "Effusion": "Effu",
  "Infiltration": "Infi",
  "Mass": "Mass",
  "Nodule": "Nodu",
  "Pneumonia": "Pna",
  "Pneumothorax": "Ptx",
  "Consolidation": "Cons",
  "Edema": "Edem",
  "Emphysema": "Emph",
  "Fibrosis": "Fibr",
  "Pleural_Thickening": "PlTh",
  "Hernia": "Hern",
}


def read_image(path: str | Path) -> np.ndarray:
  """Any supported file -> uint8 (H, W) grey; raises imageio.ImageError naming the file."""
  if dicom.is_dicom(path):
    return dicom.read_dicom(path)
  return imageio.read_gray(path)


def _output_stems(paths: Sequence[str]) -> list[str]:
  """File stems made unique (a numbered prefix where two inputs share a stem)."""
  stems = [Path(p).stem or "image" for p in paths]
  dup = {s for s in stems if stems.count(s) > 1}
  return [f"{i:03d}_{s}" if s in dup else s for i, s in enumerate(stems)]


def read_inputs(paths: Sequence[str], input_size: int, progress: bool = False):
  """(model inputs uint8 (n, S, S, 1), their prepared 512 px images, indices of `paths`
  read, failures [(path, message)]): every file on its own, a bad one never stops the rest."""
  inputs, prepared, ok, failures = [], [], [], []
  bar = tqdm(total=len(paths), desc="read", unit="img", disable=not progress, file=sys.stderr)
  for i, path in enumerate(paths):
    try:
      gray = read_image(path)
      prepared.append(pipeline.prepared_image(gray))
      inputs.append(inference.model_input(gray, input_size))
      ok.append(i)
    except (UserError, OSError, ValueError, cv2.error) as e:
      msg = str(e) if str(path) in str(e) else f"{path}: {e}"
      failures.append((str(path), msg))
      print(f"lsemil predict: {msg}", file=sys.stderr, flush=True)
    bar.update(1)
  bar.close()
  s = int(input_size)
  images = np.stack(inputs) if inputs else np.zeros((0, s, s, 1), np.uint8)
  return images, prepared, ok, failures


def predict_files(
  loaded: inference.LoadedModel,
  paths: Sequence[str],
  out_dir: str | Path | None,
  *,
  threshold: float = 0.5,
  batch_size: int = 16,
  progress: bool = True,
) -> tuple[list[dict], list[tuple[str, str]]]:
  """Predicts every readable file; returns (rows, failures).

  rows: [{'path', 'probs': {class: p}, 'overlays': [file names]}] in input order (readable
  files only); failures: [(path, message)]. With `out_dir`, overlays (one per image and class
  with p >= threshold) and predictions.csv are written there.
  """
  from lsemil import report

  paths = [str(p) for p in paths]
  images, prepared, ok, failures = read_inputs(paths, loaded.model.input_size, progress)
  predictor = inference.Predictor(loaded.model, loaded.variables)
  out = predictor.predict_images(images, batch_size, saliency=out_dir is not None)
  out_path = Path(fileio.resolve(out_dir)) if out_dir is not None else None
  if out_path is not None:
    out_path.mkdir(parents=True, exist_ok=True)
  stems = _output_stems(paths)
  rows = []
  for j, i in enumerate(ok):
    probs = np.asarray(out["probs"][j], np.float64)
    row = {"path": paths[i], "probs": dict(zip(CLASSES, probs.tolist(), strict=True))}
    row["overlays"] = []
    for k, cls in enumerate(CLASSES):
      if probs[k] >= threshold and out_path is not None:
        name = f"{stems[i]}_{cls}.png"
        title = f"{Path(paths[i]).name}: {cls} p={probs[k]:.3f}"
        report.overlay_png(out_path / name, prepared[j], out["saliency"][j, ..., k], title=title)
        row["overlays"].append(name)
    rows.append(row)
  if out_path is not None:
    fileio.write_text(out_path / "predictions.csv", to_csv(rows, threshold))
  return rows, failures


def to_csv(rows: Sequence[dict], threshold: float) -> str:
  """`inference.predictions_csv` (image_id = file name, no patient id), then the path and the
  classes at or above the threshold ('|'-joined)."""
  probs = np.array([[r["probs"][c] for c in CLASSES] for r in rows], np.float64)
  above = ["|".join(c for c in CLASSES if r["probs"][c] >= threshold) for r in rows]
  return inference.predictions_csv(
    [Path(r["path"]).name for r in rows],
    [None] * len(rows),
    probs.reshape(len(rows), len(CLASSES)),
    extra={"path": [r["path"] for r in rows], f"classes_p>={threshold:g}": above},
  )


def format_table(rows: Sequence[dict], threshold: float) -> str:
  """A plain-text table: one line per image, one column per class (short names, legend)."""
  if not rows:
    return "no readable images"
  names = [Path(r["path"]).name for r in rows]
  w = min(max(len(n) for n in names), 40)
  head = f"{'image':<{w}}  " + " ".join(f"{SHORT_NAMES[c]:>5} " for c in CLASSES)
  lines = [head, "-" * len(head)]
  for n, r in zip(names, rows, strict=True):
    cells = " ".join(
      f"{r['probs'][c]:5.3f}" + ("*" if r["probs"][c] >= threshold else " ") for c in CLASSES
    )
    lines.append(f"{n[-w:]:<{w}}  {cells}")
  legend = ", ".join(f"{SHORT_NAMES[c]}={c}" for c in CLASSES)
  lines.append(f"* p >= {threshold:g}.  {legend}")
  return "\n".join(line.rstrip() for line in lines)
