"""Small synthetic datasets in the official layout of each source (`lsemil synth --layout S`).

`write(layout, out, patients=, size=, seed=)` draws the images of `lsemil.data.phantoms`
(`plan` and `render_image`: the same patients, follow-ups, planted findings and boxes as the
NIH layout) and files them as the release of `layout` does, with its CSV headers, file names
and image format (see each reader's docstring in `lsemil.data`):

- `chexpert`: `train.csv` / `valid.csv` (Path under the folder's own name,
  `<out>/train/patientNNNNN/studyK/view1_frontal.jpg`), JPEG, some studies with a lateral
  view too, the 14 CheXpert observations mapped from the planted NIH findings (`CHEXPERT_OF`),
  some uncertain (-1.0) and many blank;
- `csv`: `labels.csv` (the 14 NIH names as class columns, 1 / 0 / -1 / blank, no split
  column) and `boxes.csv` (the planted boxes of the 8 box classes on the phantom test images),
  PNG under `images/`;
- `rsna-pneumonia`: `stage_2_train_labels.csv` (one row per box of a planted Pneumonia,
  Consolidation or Infiltration finding; blank boxes for the others),
  `stage_2_detailed_class_info.csv`, DICOM `stage_2_train_images/<patientId>.dcm`;
- `siim-acr`: `train-rle.csv` (`ImageId, EncodedPixels`; a planted Pneumothorax's box as a
  mask in two components, left and right halves, one row each; -1 otherwise), DICOM in
  `dicom-images-train/<study>/<series>/<ImageId>.dcm`;
- `mimic-cxr-jpg`: the three gzipped CSVs of MIMIC-CXR-JPG 2.0.0 (labels per study in the
  file's alphabetical column order, the split with train / validate / test, the metadata
  with ViewPosition), JPEG under `files/pXX/pSUBJECT/sSTUDY/`, some studies with a LATERAL
  image too;
- `vindr-cxr`: the VinBigData competition's `train.csv` (three readers of R1-R17 per image,
  each marking a planted finding with probability `VINDR_MARK_P`, its box moved by up to
  2 px; 'No finding' rows with empty boxes), DICOM `train/<image_id>.dicom`.

Each folder also gets `lsemil_dataset.json`: {"kind": "synthetic", "layout", "image_size",
"seed", "patients", "expected"}, where `expected` holds the generator's own counts under the
default policies (uncertain ignore, blank zeros, frontal views): images, patients, per class
positives / unknown / boxes, mask images and left-out lateral views. Boxes and masks are in
pixels of the stored `size` x `size` images (the marker tells the readers so). DICOM needs
pydicom (the `dicom` extra).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from lsemil.core import fileio
from lsemil.core.errors import DataError
from lsemil.data import catalog, chexpert, mimic, phantoms, rsna, siim, vindr
from lsemil.data.nih import BOX_CLASSES, CLASSES, MARKER_NAME

LAYOUTS: tuple[str, ...] = (
  "nih", chexpert.NAME, catalog.NAME, rsna.NAME, siim.NAME, mimic.NAME, vindr.NAME,
)
SIZES = (128, 256, 512, 1024)
# NIH finding of a phantom -> (CheXpert observation, VinDr-CXR finding); None: the source has
# no such name (the synthetic labels only; no cross-dataset synonym table is implied).
PHANTOM_NAMES = {
  "Atelectasis": ("Atelectasis", "Atelectasis"),
  "Cardiomegaly": ("Cardiomegaly", "Cardiomegaly"),
  "Effusion": ("Pleural Effusion", "Pleural effusion"),
  "Infiltration": ("Lung Opacity", "Infiltration"),
  "Mass": ("Lung Lesion", "Nodule/Mass"),
  "Nodule": ("Lung Lesion", "Nodule/Mass"),
  "Pneumonia": ("Pneumonia", "Lung Opacity"),
  "Pneumothorax": ("Pneumothorax", "Pneumothorax"),
  "Consolidation": ("Consolidation", "Consolidation"),
  "Edema": ("Edema", None),
  "Fibrosis": (None, "Pulmonary fibrosis"),
  "Pleural_Thickening": ("Pleural Other", "Pleural thickening"),
}
CHEXPERT_OF = {k: v[0] for k, v in PHANTOM_NAMES.items() if v[0]}
VINDR_OF = {k: v[1] for k, v in PHANTOM_NAMES.items() if v[1]}
VINDR_MARK_P = 0.8  # a reader marks a planted finding (else misses it)
RSNA_OPACITIES = ("Pneumonia", "Consolidation", "Infiltration")
LATERAL_P = 0.3  # a CheXpert study with a lateral view as well
UNCERTAIN_PLANTED_P = 0.15  # a planted finding written as uncertain (-1)
NEGATIVE_P = 0.3  # an absent finding written as 0 (else blank, or uncertain below)
UNCERTAIN_ABSENT_P = 0.05


def _rng(seed: int, spec: phantoms.ImageSpec, salt: int) -> np.random.Generator:
  return np.random.default_rng([seed, spec.patient, spec.follow_up, 900 + salt])


def _csv_bytes(header: Sequence[str] | str, rows: Sequence[Sequence]) -> bytes:
  buf = io.StringIO()
  buf.write((header if isinstance(header, str) else ",".join(header)) + "\n")
  csv.writer(buf, lineterminator="\n").writerows(rows)
  return buf.getvalue().encode()


def _cells(rng, present: set[str], names: Sequence[str], fmt: str) -> list[str]:
  """1 / -1 for the present names, 0 / -1 / blank for the others, as `fmt` writes numbers."""
  out = []
  for name in names:
    u = rng.random()
    if name in present:
      out.append(fmt.format(-1 if u < UNCERTAIN_PLANTED_P else 1))
    elif u < NEGATIVE_P:
      out.append(fmt.format(0))
    elif u < NEGATIVE_P + UNCERTAIN_ABSENT_P:
      out.append(fmt.format(-1))
    else:
      out.append("")
  return out


class _Expected:
  """The generator's own counts (see the module docstring)."""

  def __init__(self, classes: Sequence[str]):
    self.classes = list(classes)
    self.images, self.patients, self.test_images, self.lateral, self.masks = 0, set(), 0, 0, 0
    self.positives = dict.fromkeys(classes, 0)
    self.unknown = dict.fromkeys(classes, 0)
    self.boxes = dict.fromkeys(classes, 0)

  def add(self, patient, cells: Sequence[str], test: bool = False) -> None:
    self.images += 1
    self.test_images += int(test)
    self.patients.add(patient)
    for name, cell in zip(self.classes, cells, strict=True):
      v = float(cell) if cell else 0.0
      self.positives[name] += int(v == 1)
      self.unknown[name] += int(v == -1)

  def as_dict(self) -> dict:
    return {
      "images": self.images, "patients": len(self.patients), "test_images": self.test_images,
      "lateral_left_out": self.lateral, "mask_images": self.masks,
      "classes": {c: {"positives": self.positives[c], "unknown": self.unknown[c],
                      "boxes": self.boxes[c]} for c in self.classes},
    }  # fmt: skip


def _encode(img: np.ndarray, ext: str) -> bytes:
  ok, data = cv2.imencode(ext, img)
  if not ok:
    raise RuntimeError(f"cannot encode an image as {ext}")
  return data.tobytes()


def _dicom_bytes(img: np.ndarray, patient_id: str, sop_uid: str) -> bytes:
  try:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
  except ImportError:
    raise DataError("DICOM layouts need pydicom: pip install 'lsemil[dicom]'") from None
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = sop_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_uid
  ds.PatientID, ds.Modality, ds.ViewPosition = patient_id, "CR", "PA"
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.Rows, ds.Columns = img.shape
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  ds.PixelData = np.ascontiguousarray(img, np.uint8).tobytes()
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True)
  return buf.getvalue()


def _chexpert_cells(rng, spec: phantoms.ImageSpec) -> list[str]:
  """The 14 CheXpert cells (`chexpert.LABELS` order) of a phantom: No Finding 1.0 or blank."""
  present = {CHEXPERT_OF[CLASSES[c]] for c in spec.classes if CLASSES[c] in CHEXPERT_OF}
  return ["1.0" if not spec.classes else "", *_cells(rng, present, chexpert.LABELS[1:], "{:.1f}")]


def _chexpert(out: Path, specs, size: int, seed: int) -> _Expected:
  exp = _Expected(chexpert.LABELS)
  rows = {"train": [], "valid": []}
  for spec in specs:
    img, _ = phantoms.render_image(spec, size=size, seed=seed)
    rng = _rng(seed, spec, 0)
    cells = _chexpert_cells(rng, spec)
    split = "valid" if spec.split == "test" else "train"
    study = f"{split}/patient{spec.patient:05d}/study{spec.follow_up + 1}"
    views = [("view1_frontal.jpg", "Frontal", img)]
    if rng.random() < LATERAL_P:
      views.append(("view2_lateral.jpg", "Lateral", np.ascontiguousarray(img[:, ::-1])))
    for name, view, pixels in views:
      fileio.write_bytes(out / study / name, _encode(pixels, ".jpg"))
      sex = {"M": "Male", "F": "Female"}[spec.gender]
      position = spec.view if view == "Frontal" else ""
      rows[split].append([f"{out.name}/{study}/{name}", sex, spec.age, view, position, *cells])
      if view == "Frontal":
        exp.add(spec.patient, cells, test=split == "valid")
      else:
        exp.lateral += 1
  for split, lines in rows.items():
    fileio.write_bytes(out / f"{split}.csv", _csv_bytes(chexpert.HEADER, lines))
  return exp


def _catalog(out: Path, specs, size: int, seed: int) -> _Expected:
  exp = _Expected(CLASSES)
  labels, boxes = [], []
  for spec in specs:
    img, planted = phantoms.render_image(spec, size=size, seed=seed)
    path = f"images/{spec.image_id}"
    fileio.write_bytes(out / path, _encode(img, ".png"))
    cells = _cells(_rng(seed, spec, 1), {CLASSES[c] for c in spec.classes}, CLASSES, "{:d}")
    labels.append([path, f"P{spec.patient}", *cells])
    exp.add(spec.patient, cells)
    if spec.split == "test":
      for c, box in sorted(planted.items()):
        if CLASSES[c] in BOX_CLASSES:
          boxes.append([path, CLASSES[c], *box])
          exp.boxes[CLASSES[c]] += 1
  fileio.write_bytes(out / catalog.LABELS_NAME, _csv_bytes(["path", "patient", *CLASSES], labels))
  fileio.write_bytes(out / catalog.BOXES_NAME, _csv_bytes(catalog.BOX_HEADER, boxes))
  return exp


def _rsna(out: Path, specs, size: int, seed: int) -> _Expected:
  exp = _Expected(rsna.CLASSES)
  labels, details = [], []
  for spec in specs:
    img, planted = phantoms.render_image(spec, size=size, seed=seed)
    pid = str(uuid.UUID(bytes=_rng(seed, spec, 2).bytes(16)))
    fileio.write_bytes(out / rsna.IMAGES_DIR / f"{pid}.dcm", _dicom_bytes(img, pid, _uid(spec)))
    opaque = [b for c, b in sorted(planted.items()) if CLASSES[c] in RSNA_OPACITIES]
    for x, y, w, h in opaque:
      labels.append([pid, float(x), float(y), float(w), float(h), 1])
    if not opaque:
      labels.append([pid, "", "", "", "", 0])
    kind = "No Lung Opacity / Not Normal" if spec.classes else "Normal"
    details.append([pid, "Lung Opacity" if opaque else kind])
    exp.add(pid, ["1" if opaque else "0"])
    exp.boxes["Lung Opacity"] += len(opaque)
  fileio.write_bytes(out / rsna.LABELS_NAME, _csv_bytes(rsna.HEADER, labels))
  fileio.write_bytes(out / rsna.DETAILS_NAME, _csv_bytes(["patientId", "class"], details))
  return exp


def _mimic(out: Path, specs, size: int, seed: int) -> _Expected:
  exp = _Expected(chexpert.LABELS)
  alphabetical = sorted(chexpert.LABELS)
  labels, split_rows, meta_rows = [], [], []
  for spec in specs:
    img, _ = phantoms.render_image(spec, size=size, seed=seed)
    rng = _rng(seed, spec, 3)
    cells = _chexpert_cells(rng, spec)
    subject = f"{10_000_000 + spec.patient}"
    study = f"{50_000_000 + spec.patient * 10 + spec.follow_up}"
    split = "test" if spec.split == "test" else "validate" if spec.patient % 5 == 0 else "train"
    labels.append([subject, study, *(cells[chexpert.LABELS.index(c)] for c in alphabetical)])
    views = [(spec.view, img)]
    if rng.random() < LATERAL_P:
      views.append(("LATERAL", np.ascontiguousarray(img[:, ::-1])))
    for position, pixels in views:
      dicom = "-".join(rng.bytes(4).hex() for _ in range(5))
      folder = out / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
      fileio.write_bytes(folder / f"{dicom}.jpg", _encode(pixels, ".jpg"))
      split_rows.append([dicom, study, subject, split])
      meta_rows.append([dicom, subject, study, f"CHEST ({position})", position, size, size])
      if position == "LATERAL":
        exp.lateral += 1
      else:
        exp.add(subject, cells, test=split == "test")
  files = {
    mimic.LABELS_NAME: (["subject_id", "study_id", *alphabetical], labels),
    mimic.SPLIT_NAME: (list(mimic.IDS) + ["split"], split_rows),
    mimic.METADATA_NAME: (["dicom_id", "subject_id", "study_id",
                           "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                           "Columns"], meta_rows),
  }
  for name, (header, rows) in files.items():
    fileio.write_bytes(out / f"{name}.gz", gzip.compress(_csv_bytes(header, rows), mtime=0))
  return exp


def _vindr(out: Path, specs, size: int, seed: int) -> _Expected:
  exp = _Expected(vindr.COMPETITION_CLASSES)
  rows = []
  for spec in specs:
    img, planted = phantoms.render_image(spec, size=size, seed=seed)
    rng = _rng(seed, spec, 4)
    image_id = rng.bytes(16).hex()
    fileio.write_bytes(out / "train" / f"{image_id}.dicom", _dicom_bytes(img, image_id, _uid(spec)))
    findings = [(VINDR_OF[CLASSES[c]], box) for c, box in sorted(planted.items())
                if CLASSES[c] in VINDR_OF]
    marked = set()
    for reader in rng.choice(17, size=3, replace=False) + 1:
      drawn = [(name, box) for name, box in findings if rng.random() < VINDR_MARK_P]
      for name, (x, y, w, h) in drawn:
        dx, dy = rng.integers(-2, 3, size=2)
        x0, y0 = max(0, x + dx), max(0, y + dy)
        x1, y1 = min(size, x + w + dx), min(size, y + h + dy)
        if x1 <= x0 or y1 <= y0:
          x0, y0, x1, y1 = x, y, x + w, y + h
        code = vindr.COMPETITION_CLASSES.index(name)
        rows.append([image_id, name, code, f"R{reader}", *(float(v) for v in (x0, y0, x1, y1))])
        exp.boxes[name] += 1
        marked.add(name)
      if not drawn:
        rows.append([image_id, vindr.NO_FINDING, 14, f"R{reader}", "", "", "", ""])
    exp.add(image_id, ["1" if name in marked else "0" for name in vindr.COMPETITION_CLASSES])
  fileio.write_bytes(out / vindr.COMPETITION_NAME, _csv_bytes(vindr.COMPETITION_HEADER, rows))
  return exp


def _uid(spec: phantoms.ImageSpec, level: int = 4) -> str:
  return f"1.2.276.0.7230010.3.1.{level}.{spec.patient}.{spec.follow_up}"


def _siim(out: Path, specs, size: int, seed: int) -> _Expected:
  exp = _Expected(siim.CLASSES)
  rows = []
  for spec in specs:
    img, planted = phantoms.render_image(spec, size=size, seed=seed)
    image_id = _uid(spec)
    folder = out / siim.IMAGES_DIR / _uid(spec, 2) / _uid(spec, 3)
    fileio.write_bytes(folder / f"{image_id}.dcm", _dicom_bytes(img, str(spec.patient), image_id))
    box = planted.get(CLASSES.index("Pneumothorax"))
    if box is None:
      rows.append([image_id, siim.EMPTY])
      exp.add(image_id, ["0"])
      continue
    x, y, w, h = box
    halves = [(x, x + w // 2), (x + w // 2, x + w)] if w >= 2 else [(x, x + w)]
    for lo, hi in halves:
      mask = np.zeros((size, size), bool)
      mask[y : y + h, lo:hi] = True
      rows.append([image_id, siim.encode_rle(mask)])
    exp.add(image_id, ["1"])
    exp.masks += 1
  fileio.write_bytes(out / siim.RLE_NAMES[0], _csv_bytes("ImageId, EncodedPixels", rows))
  return exp


_WRITERS = {chexpert.NAME: _chexpert, catalog.NAME: _catalog, rsna.NAME: _rsna, siim.NAME: _siim,
            mimic.NAME: _mimic, vindr.NAME: _vindr}


def write(
  layout: str, out_dir: str | os.PathLike, *, patients: int, size: int, seed: int = 0
) -> dict:
  """Writes a synthetic dataset of `layout` (not `nih`: `phantoms.synthesize` writes that)
  into `out_dir` and returns the marker it wrote (with the `expected` counts)."""
  if layout not in _WRITERS:
    raise DataError(f"unknown layout {layout!r}; expected one of {', '.join(_WRITERS)}")
  if size not in SIZES:
    raise DataError(f"size must be one of {SIZES}, got {size}")
  out = Path(out_dir)
  if out.is_dir() and any(out.iterdir()):
    raise DataError(f"{out} is not empty; write a {layout} layout into a new folder")
  out.mkdir(parents=True, exist_ok=True)
  expected = _WRITERS[layout](out, phantoms.plan(patients, seed), size, seed)
  marker = {"kind": "synthetic", "layout": layout, "image_size": size, "box_space": size,
            "seed": seed, "patients": patients, "expected": expected.as_dict()}
  fileio.write_bytes(out / MARKER_NAME, (json.dumps(marker, indent=2) + "\n").encode())
  return marker
