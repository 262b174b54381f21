"""`lsemil predict`: class probabilities and saliency overlays for image files (Sec 3.6, 4.4).

  lsemil predict --checkpoint C IMG [IMG ...] [--out DIR] [--threshold 0.5]

C is a training workdir (its best checkpoint), its checkpoints/ folder or one step folder.
Each image (PNG, JPEG or anything OpenCV reads; DICOM with the `dicom` extra) is converted to
8-bit grey, resized to 512 x 512 as `lsemil prepare` does (Sec 4.2) and then to the model's
input side as the evaluation pipeline does, so predictions match `lsemil evaluate`. Images run
through the model in batches.

DICOM (`read_dicom`): the Modality LUT / RescaleSlope and RescaleIntercept are applied, then
the VOI LUT (a VOI LUT Sequence, else the first WindowCenter / WindowWidth pair, with the
linear function of DICOM PS3.3 C.11.2.1.2), else a min-max stretch; MONOCHROME1 images (bright
= low values) are inverted so that bone is bright as in the NIH PNGs.

Output: a table of the 14 class probabilities per image on stdout, DIR/predictions.csv, and
for every image and class with probability >= threshold the class's saliency map S (Sec 3.6)
over the image as DIR/<image>_<class>.png (`lsemil.report.overlay_png`). A file that cannot be
read is reported on stderr by name and skipped; the others complete and the exit status is 1.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lsemil.data import imageio
from lsemil.data.nih import CLASSES

PREPARED_SIZE = 512  # images are resized to 512 x 512 first, as `lsemil prepare` (Sec 4.2)
DICOM_SUFFIXES = (".dcm", ".dicom")
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


# --------------------------------------------------------------------------- reading images


def is_dicom(path: str | Path) -> bool:
  """A .dcm / .dicom name, or the 'DICM' magic at byte 128 of the file."""
  path = Path(path)
  if path.suffix.lower() in DICOM_SUFFIXES:
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return head[128:132] == b"DICM"


def _first(value) -> float:
  """First value of a DICOM (multi-)value as float."""
  if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
    return float(value)
  return float(value[0])


def window_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
  """DICOM PS3.3 C.11.2.1.2 'LINEAR' VOI windowing onto [0, 1]."""
  width = max(float(width), 1.0)
  y = (x - (center - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (x > center - 0.5) * 1.0
  return np.clip(y, 0.0, 1.0)


def read_dicom(path: str | Path) -> np.ndarray:
  """A DICOM file -> uint8 (H, W) grey, bright = dense (see the module docstring)."""
  path = Path(path)
  try:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
  except ImportError:
    raise imageio.ImageError(
      f"{path}: reading DICOM needs pydicom (pip install 'lsemil[dicom]')"
    ) from None
  try:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
  except Exception as e:  # pydicom raises many kinds for bad files
    raise imageio.ImageError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from None
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
  samples = int(ds.get("SamplesPerPixel", 1))
  if samples == 1 and arr.ndim == 3:  # multi-frame: the first frame
    arr = arr[0]
  if samples > 1:
    if arr.ndim == 4:
      arr = arr[0]
    return imageio.to_gray8(np.ascontiguousarray(arr[..., ::-1]), str(path))  # RGB -> BGR
  if arr.ndim != 2:
    raise imageio.ImageError(f"{path}: unsupported DICOM pixel array shape {arr.shape}")
  x = np.asarray(apply_modality_lut(arr, ds), np.float64)
  if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
    bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
    y = np.asarray(apply_voi_lut(x, ds, index=0, prefer_lut=True), np.float64)
    y = np.clip(y / (2.0**bits - 1.0), 0.0, 1.0)
  elif "WindowCenter" in ds and "WindowWidth" in ds:
    y = window_linear(x, _first(ds.WindowCenter), _first(ds.WindowWidth))
  else:
    lo, hi = float(x.min()), float(x.max())
    y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
  if photometric == "MONOCHROME1":
    y = 1.0 - y
  return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
  """Any supported file -> uint8 (H, W) grey; raises imageio.ImageError naming the file."""
  if is_dicom(path):
    return read_dicom(path)
  return imageio.read_gray(path)


def model_input(gray: np.ndarray, input_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (H, W) -> (the 512 x 512 prepared image, uint8 (S, S, 1) model input)."""
  from lsemil.data import pipeline

  prepared = imageio.resize_gray(gray, PREPARED_SIZE)
  return prepared, pipeline.warp(prepared, int(input_size))[:, :, None]


# --------------------------------------------------------------------------- prediction


def _output_stems(paths: Sequence[str]) -> list[str]:
  """File stems made unique (a numbered prefix where two inputs share a stem)."""
  stems = [Path(p).stem or "image" for p in paths]
  dup = {s for s in stems if stems.count(s) > 1}
  return [f"{i:03d}_{s}" if s in dup else s for i, s in enumerate(stems)]


def predict_files(
  config,
  model,
  variables,
  paths: Sequence[str],
  out_dir: str | Path | None,
  *,
  threshold: float = 0.5,
  batch_size: int = 16,
  predict_fn=None,
  progress: bool = True,
) -> tuple[list[dict], list[tuple[str, str]]]:
  """Predicts every readable file; returns (rows, failures).

  rows: [{'path', 'probs': {class: p}, 'overlays': [file names]}] in input order (readable
  files only); failures: [(path, message)]. With `out_dir`, overlays (one per image and class
  with p >= threshold) and predictions.csv are written there.
  """
  from lsemil import report
  from lsemil import train as train_lib

  predict_fn = predict_fn or train_lib.make_predict_fn(model)
  size = int(config.model.input_size)
  out = Path(out_dir) if out_dir is not None else None
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
  stems = _output_stems(paths)
  rows: list[dict] = []
  failures: list[tuple[str, str]] = []
  batch_size = max(1, int(batch_size))
  bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr)
  for start in range(0, len(paths), batch_size):
    chunk = []
    for i in range(start, min(start + batch_size, len(paths))):
      try:
        prepared, x = model_input(read_image(paths[i]), size)
      except (imageio.ImageError, OSError, ValueError) as e:
        msg = str(e) if str(paths[i]) in str(e) else f"{paths[i]}: {e}"
        failures.append((str(paths[i]), msg))
        print(f"lsemil predict: {msg}", file=sys.stderr, flush=True)
        bar.update(1)
        continue
      chunk.append((i, prepared, x))
    if not chunk:
      continue
    images = np.zeros((batch_size, size, size, 1), np.float32)  # fixed shape: one compile
    for j, (_, _, x) in enumerate(chunk):
      images[j] = x
    pred = predict_fn(variables, images)
    probs = np.asarray(pred["probs"], np.float64)
    saliency = np.asarray(pred["saliency"], np.float32)
    for j, (i, prepared, _) in enumerate(chunk):
      row = {"path": str(paths[i]), "probs": dict(zip(CLASSES, probs[j].tolist(), strict=True))}
      row["overlays"] = []
      for k, cls in enumerate(CLASSES):
        if probs[j, k] >= threshold and out is not None:
          name = f"{stems[i]}_{cls}.png"
          title = f"{Path(paths[i]).name}: {cls} p={probs[j, k]:.3f}"
          report.overlay_png(out / name, prepared, saliency[j, ..., k], title=title)
          row["overlays"].append(name)
      rows.append(row)
      bar.update(1)
  bar.close()
  if out is not None:
    (out / "predictions.csv").write_text(to_csv(rows, threshold), encoding="utf-8")
  return rows, failures


def to_csv(rows: Sequence[dict], threshold: float) -> str:
  """path, the 14 probabilities, and the classes at or above the threshold ('|'-joined)."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["path", *CLASSES, f"classes_p>={threshold:g}"])
  for r in rows:
    above = [c for c in CLASSES if r["probs"][c] >= threshold]
    w.writerow([r["path"], *(f"{r['probs'][c]:.6f}" for c in CLASSES), "|".join(above)])
  return buf.getvalue()


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


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="lsemil predict",
    description="Per-class probabilities and saliency overlays (Yao et al. 2018, Sec 3.6) for "
    "PNG / JPEG / DICOM chest X-rays. Prints a table; writes DIR/predictions.csv and "
    "DIR/<image>_<class>.png for each class at or above --threshold. Exit status 1 if any file "
    "could not be read (the others still complete).",
  )
  p.add_argument(
    "--checkpoint",
    required=True,
    help="a training workdir, its checkpoints/ folder or a step folder",
  )
  p.add_argument("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, DICOM)")
  p.add_argument(
    "--out",
    default="predictions",
    help="output folder for predictions.csv and overlays (default ./predictions)",
  )
  p.add_argument(
    "--threshold",
    type=float,
    default=0.5,
    help="probability at or above which a class gets an overlay (default 0.5)",
  )
  p.add_argument(
    "--which",
    choices=("best", "latest"),
    default="best",
    help="checkpoint of a workdir (default best validation mean AUC)",
  )
  p.add_argument("--batch-size", type=int, default=16, help="images per forward (default 16)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  if not 0.0 <= args.threshold <= 1.0:
    print(f"lsemil predict: --threshold must lie in [0, 1], got {args.threshold}", file=sys.stderr)
    return 2
  from lsemil import evaluate as ev

  try:
    config, model, variables, step, info = ev.load_checkpoint(args.checkpoint, args.which)
  except (ev.EvaluateError, FileNotFoundError, ValueError) as e:
    print(f"lsemil predict: {e}", file=sys.stderr)
    return 2
  print(f"checkpoint {info.get('checkpoint', args.checkpoint)} (step {step})", file=sys.stderr)
  rows, failures = predict_files(
    config,
    model,
    variables,
    args.images,
    args.out,
    threshold=args.threshold,
    batch_size=args.batch_size,
    progress=not args.no_progress,
  )
  print(format_table(rows, args.threshold))
  n_over = sum(len(r["overlays"]) for r in rows)
  print(f"wrote {Path(args.out) / 'predictions.csv'} and {n_over} overlays", file=sys.stderr)
  if failures:
    print(
      f"lsemil predict: {len(failures)} of {len(args.images)} files failed: "
      + ", ".join(p for p, _ in failures),
      file=sys.stderr,
    )
    return 1
  return 0
