"""The common index of every source (lsemil.data.index): label policies, CSV rows, splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsemil.core.errors import DataError
from lsemil.data import index

NAN = math.nan

# (cell, uncertain policy, blank policy) -> value; NaN = unknown (masked).
POLICY_TABLE = [
  ("1", "ignore", "zeros", 1.0), ("1.0", "zeros", "ignore", 1.0), ("1", "ones", "zeros", 1.0),
  ("0", "ignore", "zeros", 0.0), ("0.0", "ones", "ignore", 0.0), ("0", "zeros", "zeros", 0.0),
  ("-1", "ignore", "zeros", NAN), ("-1.0", "zeros", "zeros", 0.0), ("-1", "ones", "ignore", 1.0),
  ("", "ignore", "zeros", 0.0), ("", "ones", "ignore", NAN), (" ", "zeros", "ignore", NAN),
  ("", "zeros", "zeros", 0.0),
]


@pytest.mark.parametrize(("cell", "uncertain", "blank", "want"), POLICY_TABLE)
def test_label_policies_over_1_0_minus1_blank(cell, uncertain, blank, want):
  policy = index.LabelPolicy.of(index.Options(uncertain=uncertain, blank=blank))
  got = index.label_value(cell, policy, "f.csv:3", "Edema")
  assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize("cell", ["2", "yes", "0.5", "nan", "1.00001"])
def test_a_value_outside_the_four_is_an_error_naming_file_line_and_column(cell):
  policy = index.LabelPolicy.of(index.Options())
  with pytest.raises(DataError, match=r"f\.csv:3: 'Edema' is .* expected 1, 0, -1 or blank"):
    index.label_value(cell, policy, "f.csv:3", "Edema")


def test_bad_options_are_refused():
  with pytest.raises(DataError, match="uncertain must be one of"):
    index.Options(uncertain="maybe")
  with pytest.raises(DataError, match="views must be one of"):
    index.Options(views="lateral")


def test_table_rows_strip_header_names_and_name_long_rows(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text("ImageId, EncodedPixels\na,-1\n\nb,1 2\nc,1,2\n")
  header, rows = index.table_rows(path, required=("EncodedPixels",))
  assert header == ["ImageId", "EncodedPixels"]
  assert next(rows) == (f"{path}:2", {"ImageId": "a", "EncodedPixels": "-1"})
  assert next(rows) == (f"{path}:4", {"ImageId": "b", "EncodedPixels": "1 2"})
  with pytest.raises(DataError, match=r"t\.csv:5: 3 fields where the header has 2"):
    next(rows)
  with pytest.raises(DataError, match=r"t\.csv:1: header lacks column 'x'"):
    index.table_rows(path, required=("x",))


def test_patient_splits_are_patient_wise_deterministic_and_sized():
  patients = np.asarray([f"p{i % 40}" for i in range(100)])
  options = index.Options(seed=3)
  a, b = index.patient_splits(patients, options), index.patient_splits(patients[::-1], options)
  assert a.tolist() == b[::-1].tolist()  # a function of the patient, not of the row order
  owner = {}
  for p, s in zip(patients, a, strict=True):
    assert owner.setdefault(p, s) == s
  counts = {s: len({p for p, t in owner.items() if t == s}) for s in index.SPLITS}
  assert counts == {"test": 8, "valid": 8, "train": 24}
  assert index.patient_splits(patients, index.Options(seed=4)).tolist() != a.tolist()


def test_a_patient_in_two_splits_names_both_rows():
  with pytest.raises(DataError, match=r"f:3: patient q is in split test here and in train at f:1"):
    index.check_patient_splits(np.asarray(["q", "r", "q"]), np.asarray(["train", "test", "test"]),
                               ["f:1", "f:2", "f:3"])
