"""Benchmark: `lsemil stats --source S` on full-size synthetic METADATA (no images) of each source.

  python benchmarks/source_readers.py [--sources chexpert,mimic-cxr-jpg,...] [--keep DIR]

Writes each release's metadata files in their official format and at their real size, without
an image (stats reads metadata only; every image is then counted as missing, which stats does
for real data too), and times `lsemil stats --source S --data-dir D --format json` as a
subprocess: wall seconds and CPU seconds (user + system), start-up included (a `lsemil stats
--help` row gives the start-up alone). Prints a Markdown table with the machine and its load
average before and after, and whether each source is within the issue's 10 s.

Sizes (CheXpert's and RSNA's as the readers' docstrings state them; the others as the releases'
pages and papers report them):

- chexpert: CheXpert-v1.0-small/train.csv, 223,414 rows (64,540 patients, ~15 % lateral), and
  valid.csv, 234 rows (200 patients);
- mimic-cxr-jpg: mimic-cxr-2.0.0-{chexpert,split,metadata}.csv.gz for 377,110 images of
  227,835 studies (8 without a labels row) and 65,379 subjects, split 368,960 / 2,991 / 5,159;
- rsna-pneumonia: stage_2_train_labels.csv, 30,227 rows (26,684 images, 6,012 of them with
  9,555 boxes), and stage_2_detailed_class_info.csv;
- vindr-cxr: the competition's train.csv, 67,914 rows (15,000 images x 3 of 17 readers; 10,606
  images 'No finding' for all three, 36,096 boxes);
- siim-acr: train-rle.csv, 11,582 rows (10,675 images, 2,379 of them with 3,286 mask
  components on 1024 x 1024).

The labels are drawn at random with the releases' kinds of values (1 / 0 / -1 / blank, views,
boxes inside the image, run-length codes of column runs); they are not the real prevalences.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lsemil.core import tables
from lsemil.data import chexpert, mimic, rsna, siim, vindr

BUDGET_S = 10.0
SOURCES = ("chexpert", "mimic-cxr-jpg", "rsna-pneumonia", "vindr-cxr", "siim-acr")
LABEL_CELLS = ("", "1.0", "0.0", "-1.0")
LABEL_P = (0.70, 0.12, 0.13, 0.05)  # blank, positive, negative, uncertain


def _csv(path: Path, header, rows, *, gz: bool = False) -> None:
  buf = io.StringIO()
  buf.write((header if isinstance(header, str) else ",".join(header)) + "\n")
  csv.writer(buf, lineterminator="\n").writerows(rows)
  data = buf.getvalue().encode()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(data, compresslevel=6, mtime=0) if gz else data)


def _owners(rng, n: int, groups: int) -> np.ndarray:
  """Sorted group numbers of `n` items, every one of `groups` groups holding at least one."""
  return np.sort(np.concatenate([np.arange(groups), rng.integers(0, groups, n - groups)]))


def _ranks(owner: np.ndarray) -> np.ndarray:
  """Each item's number within its group (owner sorted)."""
  first = np.searchsorted(owner, owner, side="left")
  return np.arange(len(owner)) - first


def _labels(rng, n: int) -> np.ndarray:
  return np.asarray(LABEL_CELLS)[rng.choice(len(LABEL_CELLS), size=(n, 14), p=LABEL_P)]


def write_chexpert(root: Path, rng) -> Path:
  out = root / "CheXpert-v1.0-small"
  for split, n, patients, first in (("train", 223_414, 64_540, 1), ("valid", 234, 200, 64_541)):
    owner = _owners(rng, n, patients) + first
    study = _ranks(owner) + 1
    lateral = rng.random(n) < (0.145 if split == "train" else 0.15)
    labels = _labels(rng, n)
    if split == "valid":
      labels = np.where(rng.random((n, 14)) < 0.2, "1.0", "0.0")
    rows = []
    for i in range(n):
      view = "lateral" if lateral[i] else "frontal"
      path = f"{out.name}/{split}/patient{owner[i]:05d}/study{study[i]}/view1_{view}.jpg"
      rows.append([path, "Female" if i % 2 else "Male", 20 + i % 70,
                   "Lateral" if lateral[i] else "Frontal",
                   "" if lateral[i] else ("AP" if i % 3 else "PA"), *labels[i]])
    _csv(out / f"{split}.csv", chexpert.HEADER, rows)
  return out


def write_mimic(root: Path, rng) -> Path:
  out = root / "mimic-cxr-jpg" / "2.0.0"
  images, studies, subjects = 377_110, 227_835, 65_379
  study_of = _owners(rng, images, studies)
  subject_of_study = _owners(rng, studies, subjects)
  subject_ids = 10_000_000 + rng.choice(9_000_000, subjects, replace=False)
  study_ids = 50_000_000 + rng.choice(9_000_000, studies, replace=False)
  # the official split is by subject: 5,159 test and 2,991 validate images
  order = rng.permutation(subjects)
  per_subject = np.bincount(subject_of_study[study_of], minlength=subjects)
  cum = np.cumsum(per_subject[order])
  split_of_subject = np.full(subjects, "train", dtype="<U8")
  split_of_subject[order[: np.searchsorted(cum, 5_159)]] = "test"
  valid = order[np.searchsorted(cum, 5_159): np.searchsorted(cum, 5_159 + 2_991)]
  split_of_subject[valid] = "validate"
  views = np.asarray(["PA", "AP", "LATERAL", "LL", ""])[
    rng.choice(5, size=images, p=(0.255, 0.39, 0.22, 0.093, 0.042))]
  words = rng.integers(0, 1 << 32, size=(images, 5), dtype=np.uint64)
  dicom = ["-".join(f"{w:08x}" for w in row) for row in words.tolist()]
  split_rows, meta_rows = [], []
  for i in range(images):
    st = study_of[i]
    sub = subject_ids[subject_of_study[st]]
    split_rows.append([dicom[i], study_ids[st], sub, split_of_subject[subject_of_study[st]]])
    meta_rows.append([dicom[i], sub, study_ids[st], f"CHEST ({views[i] or 'UNKNOWN'})",
                      views[i], 3056, 2544, 21800101, "120000.000", "CHEST (PA AND LAT)",
                      "postero-anterior", "Erect"])
  alphabetical = sorted(chexpert.LABELS)
  labels = _labels(rng, studies)
  label_rows = [[subject_ids[subject_of_study[s]], study_ids[s], *labels[s]]
                for s in range(studies - 8)]  # 8 studies without a labels row, as 2.0.0
  _csv(out / f"{mimic.LABELS_NAME}.gz", ["subject_id", "study_id", *alphabetical], label_rows,
       gz=True)
  _csv(out / f"{mimic.SPLIT_NAME}.gz", [*mimic.IDS, "split"], split_rows, gz=True)
  _csv(out / f"{mimic.METADATA_NAME}.gz",
       ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
        "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
        "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning"], meta_rows, gz=True)
  return out


def write_rsna(root: Path, rng) -> Path:
  out = root / "rsna"
  images, positives, boxes = 26_684, 6_012, 9_555
  ids = [str(u) for u in _uuids(rng, images)]
  positive = np.zeros(images, bool)
  positive[rng.choice(images, positives, replace=False)] = True
  n_boxes = np.zeros(images, np.int64)
  n_boxes[positive] = 1 + np.minimum(3, rng.multinomial(boxes - positives,
                                                        np.full(positives, 1 / positives)))
  extra = boxes - int(n_boxes.sum())  # the cap at 4 boxes: give the rest to images below it
  for i in np.flatnonzero(positive & (n_boxes < 4))[:max(0, extra)]:
    n_boxes[i] += 1
  normal = rng.random(images) < 0.43
  labels, details = [], []
  for i, pid in enumerate(ids):
    if not positive[i]:
      labels.append([pid, "", "", "", "", 0])
      details.append([pid, "Normal" if normal[i] else "No Lung Opacity / Not Normal"])
      continue
    for _ in range(n_boxes[i]):
      w, h = rng.uniform(60, 400, 2)
      x, y = rng.uniform(0, 1024 - w), rng.uniform(0, 1024 - h)
      labels.append([pid, f"{x:.1f}", f"{y:.1f}", f"{w:.1f}", f"{h:.1f}", 1])
      details.append([pid, "Lung Opacity"])
  _csv(out / rsna.LABELS_NAME, rsna.HEADER, labels)
  _csv(out / rsna.DETAILS_NAME, ["patientId", "class"], details)
  return out


def _uuids(rng, n: int) -> list[str]:
  raw = rng.integers(0, 1 << 32, size=(n, 4), dtype=np.uint64).tolist()
  out = []
  for a, b, c, d in raw:
    h = f"{a:08x}{b:08x}{c:08x}{d:08x}"
    out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
  return out


def write_vindr(root: Path, rng) -> Path:
  out = root / "vindr"
  images, normal, box_rows = 15_000, 10_606, 36_096
  ids = [u.replace("-", "") for u in _uuids(rng, images)]
  abnormal = images - normal
  readers = np.stack([rng.choice(17, 3, replace=False) + 1 for _ in range(images)])
  # every reader of an abnormal image marks at least one box
  pairs = 3 * abnormal
  per_reader = 1 + rng.multinomial(box_rows - pairs, np.full(pairs, 1 / pairs))
  rows, k = [], 0
  for i, image_id in enumerate(ids):
    for r in readers[i]:
      if i < normal:
        rows.append([image_id, vindr.NO_FINDING, 14, f"R{r}", "", "", "", ""])
        continue
      for _ in range(per_reader[k]):
        c = int(rng.integers(14))
        x0, y0 = rng.uniform(0, 2000, 2)
        w, h = rng.uniform(20, 500, 2)
        rows.append([image_id, vindr.COMPETITION_CLASSES[c], c, f"R{r}",
                     f"{x0:.0f}", f"{y0:.0f}", f"{x0 + w:.0f}", f"{y0 + h:.0f}"])
      k += 1
  _csv(out / vindr.COMPETITION_NAME, vindr.COMPETITION_HEADER, rows)
  return out


def _rle(rng, side: int = siim.ORIGINAL_SIZE) -> str:
  """A blob of column runs in the competition's relative run-length code."""
  c0 = int(rng.integers(0, side - 220))
  width = int(rng.integers(20, 200))
  top = int(rng.integers(50, side - 400)) + np.cumsum(rng.integers(-3, 4, width))
  length = rng.integers(40, 300, width)
  starts = (c0 + np.arange(width)) * side + top
  rel = starts - np.concatenate([[0], starts[:-1] + length[:-1]])
  return " ".join(f"{s} {n}" for s, n in zip(rel.tolist(), length.tolist(), strict=True))


def write_siim(root: Path, rng) -> Path:
  out = root / "siim"
  images, positives, components = 10_675, 2_379, 3_286
  ids = [f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875{i:06d}" for i in range(images)]
  positive = np.zeros(images, bool)
  positive[rng.choice(images, positives, replace=False)] = True
  count = np.zeros(images, np.int64)
  count[positive] = 1
  for i in rng.choice(np.flatnonzero(positive), components - positives, replace=True):
    count[i] += 1
  rows = []
  for i, image_id in enumerate(ids):
    if not positive[i]:
      rows.append([image_id, siim.EMPTY])
    for _ in range(count[i]):
      rows.append([image_id, _rle(rng)])
  _csv(out / siim.RLE_NAMES[0], "ImageId, EncodedPixels", rows)
  return out


WRITERS = {"chexpert": write_chexpert, "mimic-cxr-jpg": write_mimic, "rsna-pneumonia": write_rsna,
           "vindr-cxr": write_vindr, "siim-acr": write_siim}


def _rows(folder: Path) -> int:
  total = 0
  for path in folder.rglob("*.csv*"):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
      total += sum(1 for _ in f) - 1
  return total


def timed(argv: list[str]) -> tuple[float, float, str]:
  """(wall s, CPU s of the child, its stdout) of one command."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode:
    raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return wall, cpu, proc.stdout


def machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sources", default=",".join(SOURCES))
  parser.add_argument("--keep", help="write the metadata here and keep it (default: a temp dir)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  exe = shutil.which("lsemil") or str(Path(sys.executable).parent / "lsemil")
  root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lsemil-readers-"))
  load_before = os.getloadavg()
  lines = []
  try:
    wall, cpu, _ = timed([exe, "stats", "--help"])
    lines.append(["start-up (`lsemil stats --help`)", "", "", f"{wall:.2f}", f"{cpu:.2f}", ""])
    for source in args.sources.split(","):
      start = time.perf_counter()
      folder = WRITERS[source](root / source, np.random.default_rng(args.seed))
      written = time.perf_counter() - start
      wall, cpu, out = timed([exe, "stats", "--source", source, "--data-dir", str(folder),
                              "--format", "json"])
      stats = json.loads(out)
      lines.append([f"`{source}`", f"{_rows(folder):,}", f"{stats['images']['all']:,}",
                     f"{wall:.2f}", f"{cpu:.2f}", "yes" if wall < BUDGET_S else "**no**"])
      print(f"{source}: metadata written in {written:.1f} s; stats {wall:.2f} s wall, "
            f"{cpu:.2f} s CPU", file=sys.stderr, flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  load_after = os.getloadavg()
  print(f"`lsemil stats` on full-size synthetic metadata; {machine()}; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)\n")
  print(tables.markdown(["source", "metadata rows", "images kept", "wall s", "CPU s",
                         f"< {BUDGET_S:.0f} s"], lines))


if __name__ == "__main__":
  main()
