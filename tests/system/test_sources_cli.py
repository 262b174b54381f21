"""`lsemil synth --layout S` then `lsemil stats --source S` for every non-NIH source: the counts
stats prints are the generator's own (lsemil_dataset.json's `expected`), and a missing image is
named in a warning, never fatal."""

from __future__ import annotations

import json
import warnings

import pytest

from lsemil.commands import cli
from lsemil.data import layouts

pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")

LAYOUTS = [name for name in layouts.LAYOUTS if name != "nih"]


def _stats(capsys, *args) -> tuple[dict, str]:
  capsys.readouterr()
  assert cli.main(["stats", *args, "--format", "json"]) == 0
  out = capsys.readouterr()
  return json.loads(out.out), out.err


@pytest.mark.parametrize("layout", LAYOUTS)
def test_synth_layout_then_stats_counts_what_the_generator_wrote(tmp_path, capsys, layout):
  data = tmp_path / layout
  assert cli.main(["synth", "--layout", layout, "--out", str(data), "--patients", "8",
                   "--size", "128"]) == 0
  expected = json.loads((data / "lsemil_dataset.json").read_text())["expected"]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got, _ = _stats(capsys, "--source", layout, "--data-dir", str(data))
  notes = [str(w.message) for w in caught]
  assert all("left out (views=frontal)" in n for n in notes), notes
  assert got["source"] == layout and got["missing"] == 0
  assert got["images"]["all"] == expected["images"] > 0
  assert got["patients"]["all"] == expected["patients"]
  assert got["mask_images"] == expected["mask_images"]
  for name, want in expected["classes"].items():
    row = got["classes"][name]
    assert row["train"] + row["valid"] + row["test"] == want["positives"], name
    assert (row["unknown"], row["boxes"]) == (want["unknown"], want["boxes"]), name
  if layout in ("chexpert", "mimic-cxr-jpg"):
    assert got["images"]["test"] == expected["test_images"] > 0
    assert expected["lateral_left_out"] > 0
    assert sum(c["unknown"] for c in got["classes"].values()) > 0
  if layout == "siim-acr":
    assert expected["mask_images"] > 0
  if layout == "rsna-pneumonia":
    assert expected["classes"]["Lung Opacity"]["boxes"] > 0


def test_missing_images_are_counted_and_named_never_fatal(tmp_path, capsys):
  data = tmp_path / "csv"
  assert cli.main(["synth", "--layout", "csv", "--out", str(data), "--patients", "2",
                   "--size", "128"]) == 0
  gone = sorted((data / "images").iterdir())[0]
  gone.unlink()
  with pytest.warns(UserWarning, match=rf"1 of \d+ images have no file \(images/{gone.name}\)"):
    got, _ = _stats(capsys, "--source", "csv", "--nih-dir", str(data))
  assert got["missing"] == 1

