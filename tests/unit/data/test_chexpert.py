"""The CheXpert reader (lsemil.data.chexpert) on small hand-written CSVs in the release layout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsemil.core.errors import DataError, DataWarning
from lsemil.data import chexpert, sources

HEAD = ",".join(chexpert.HEADER)
RELEASE = "CheXpert-v1.0-small"


def _row(split, patient, study, view, values):
  kind = "frontal" if view == "Frontal" else "lateral"
  cells = ["" if v is None else f"{v:.1f}" for v in values]
  path = f"{RELEASE}/{split}/patient{patient:05d}/study{study}/view1_{kind}.jpg"
  return ",".join([path, "Female", "68", view, "AP" if view == "Frontal" else "", *cells])


def _labels(**set_):
  values = [None] * len(chexpert.LABELS)
  for name, v in set_.items():
    values[chexpert.LABELS.index(name.replace("_", " "))] = v
  return values


@pytest.fixture
def release(tmp_path):
  root = tmp_path / RELEASE
  root.mkdir()
  train = [
    _row("train", 1, 1, "Frontal", _labels(Edema=1, Cardiomegaly=-1)),
    _row("train", 1, 1, "Lateral", _labels(Edema=1)),
    _row("train", 2, 1, "Frontal", _labels(No_Finding=1, Edema=0)),
    _row("train", 3, 1, "Frontal", _labels(Pneumothorax=-1)),
    _row("train", 4, 2, "Frontal", _labels(Atelectasis=1)),
  ]
  (root / "train.csv").write_text("\n".join([HEAD, *train]) + "\n")
  (root / "valid.csv").write_text(HEAD + "\n" + _row("valid", 64541, 1, "Frontal",
                                                     _labels(Edema=0)) + "\n")
  image = root / "train" / "patient00001" / "study1" / "view1_frontal.jpg"
  image.parent.mkdir(parents=True)
  image.write_bytes(b"\xff\xd8\xff")
  return root


def test_frontal_views_labels_and_splits(release):
  with pytest.warns(DataWarning) as caught:
    idx = sources.load("chexpert", release)
  notes = [str(w.message) for w in caught]
  assert any("1 lateral images left out (views=frontal)" in n for n in notes)
  assert any("4 of 5 images have no file" in n for n in notes)
  assert len(idx) == 5 and idx.classes == chexpert.LABELS
  assert idx.image_paths[0] == str(release / "train/patient00001/study1/view1_frontal.jpg")
  assert idx.missing == idx.image_ids[1:]
  edema, cardio = chexpert.LABELS.index("Edema"), chexpert.LABELS.index("Cardiomegaly")
  assert idx.labels[0, edema] == 1 and math.isnan(idx.labels[0, cardio])  # U-Ignore
  assert idx.labels[1, edema] == 0 and idx.labels[1, cardio] == 0  # blank -> 0
  assert idx.splits[-1] == "test" and set(idx.splits[:-1]) <= {"train", "valid"}
  assert idx.official_split and idx.labels.dtype == np.float32


def test_all_views_and_policies(release):
  with pytest.warns(DataWarning):
    idx = sources.load("chexpert", release, views="all", uncertain="ones", blank="ignore")
  assert len(idx) == 6
  cardio = chexpert.LABELS.index("Cardiomegaly")
  assert idx.labels[0, cardio] == 1 and math.isnan(idx.labels[1, cardio])


@pytest.mark.parametrize(("line", "match"), [
  (_row("train", 9, 1, "Frontal", _labels(Edema=2)), r"train\.csv:7: 'Edema' is '2\.0'"),
  (_row("train", 1, 1, "Frontal", _labels()), r"train\.csv:7: duplicate Path .* \(first at"),
  (_row("train", 9, 1, "Oblique", _labels()), r"train\.csv:7: 'Frontal/Lateral' is 'Oblique'"),
  (_row("train", 64541, 1, "Frontal", _labels()), r"valid\.csv:2: patient patient64541 is in"),
])
def test_bad_rows_name_file_and_line(release, line, match):
  with open(release / "train.csv", "a") as f:
    f.write(line + "\n")
  with pytest.raises(DataError, match=match):
    sources.load("chexpert", release)


def test_a_renamed_release_folder_and_no_valid_csv(release):
  (release / "valid.csv").unlink()
  renamed = release.rename(release.parent / "chexpert")
  with pytest.warns(DataWarning) as caught:
    idx = sources.load("chexpert", renamed)
  assert any("no valid.csv (optional): no test split" in str(w.message) for w in caught)
  assert idx.image_paths[0] == str(renamed / "train/patient00001/study1/view1_frontal.jpg")
  assert idx.image_ids[0] not in idx.missing and "test" not in set(idx.splits)
