"""`lsemil predict` on hostile DICOM files (Reliability round 3): each bad file lies between
good ones and is either read as DICOM allows (a zero-length window or rescale element is
absent, PS3.3 C.11.1 / C.11.2) or skipped with a one-line error naming it, while every other
file still gets its row in predictions.csv; no traceback. Multi-frame files: the first frame
with a warning (default) or refused (`--multiframe refuse`)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from lsemil.core import configuration
from lsemil.models import registry

pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")


def _ramp(h=64, w=64, top=4095) -> np.ndarray:
  return (np.arange(h * w).reshape(h, w) * top // (h * w - 1)).astype(np.uint16)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_variables, write_checkpoint):
  root = tmp_path_factory.mktemp("dicom_cli") / "run"
  config = configuration.load_config("smoke")
  model = registry.from_config(config.model, saved=True)
  write_checkpoint(root, config, random_variables(model, seed=1), 1)
  return root


@pytest.fixture(scope="module")
def files(tmp_path_factory, write_dicom):
  from pydicom.dataset import Dataset

  d = tmp_path_factory.mktemp("dicoms")
  raw = _ramp()
  nodesc = Dataset()
  nodesc.add_new(0x00283006, "US", list(range(256)))  # LUTData without LUTDescriptor
  voi8 = Dataset()
  voi8.add_new(0x00283002, "US", [4096, 0, 8])
  voi8.add_new(0x00283006, "US", [int(v) for v in np.arange(4096) // 16])
  made = {
    "good": write_dicom(d / "good.dcm", raw, WindowCenter=2048, WindowWidth=4096),
    "empty_window": write_dicom(d / "empty_window.dcm", raw, WindowCenter=None, WindowWidth=None),
    "nodesc": write_dicom(d / "nodesc.dcm", raw, VOILUTSequence=[nodesc]),
    "empty_rescale": write_dicom(
      d / "empty_rescale.dcm", raw, RescaleSlope=None, RescaleIntercept=None
    ),
    "tiny": write_dicom(d / "tiny.dcm", raw[:4, :4]),
    "voi8": write_dicom(d / "voi8.dcm", raw, VOILUTSequence=[voi8]),
    "multi": write_dicom(d / "multi.dcm", np.stack([raw, raw[::-1], raw[:, ::-1]])),
    # 7000 x 7000 x 16 bit = 98 MB of real pixel data: refused from its header.
    "huge": write_dicom(d / "huge.dcm", np.zeros((7000, 7000), np.uint16)),
    "good2": write_dicom(d / "good2.dcm", raw[::-1].copy()),
  }
  return {k: str(v) for k, v in made.items()}


def _rows(out) -> list[str]:
  with open(out / "predictions.csv") as f:
    return [r["image_id"] for r in csv.DictReader(f)]


def test_bad_dicoms_are_skipped_by_name_the_rest_predicted(lsemil, workdir, files, tmp_path):
  order = ["good", "empty_window", "nodesc", "empty_rescale", "tiny", "voi8", "huge"]
  order += ["multi", "good2"]
  out = tmp_path / "out"
  args = ["--checkpoint", workdir, "--out", out, "--no-progress", "--threshold", "1"]
  proc = lsemil.run("predict", *args, *(files[k] for k in order))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  skipped = ["nodesc", "tiny", "huge"]
  assert _rows(out) == [f"{k}.dcm" for k in order if k not in skipped]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("lsemil predict: 3 of 9 files failed: ")
  for k in skipped:
    assert files[k] in last
  lines = proc.stderr.splitlines()
  assert any(f"{files['nodesc']}: " in x and "LUT Descriptor" in x for x in lines)
  assert any(f"{files['tiny']}: 4x4 pixels, smaller than" in x for x in lines)
  assert any(f"{files['huge']}: 7000x7000 pixels, above the limit" in x for x in lines)
  warn = [x for x in lines if x.startswith("warning: ") and files["multi"] in x]
  assert len(warn) == 1 and "3 frames" in warn[0] and "first frame" in warn[0]


def test_multiframe_refuse(lsemil, workdir, files, tmp_path):
  out = tmp_path / "out"
  args = ["--checkpoint", workdir, "--out", out, "--no-progress", "--multiframe", "refuse"]
  proc = lsemil.run("predict", *args, files["good"], files["multi"], files["good2"])
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert _rows(out) == ["good.dcm", "good2.dcm"]
  assert f"{files['multi']}: multi-frame DICOM (3 frames), refused" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].endswith(f"1 of 3 files failed: {files['multi']}")
  help_text = lsemil("predict", "--help").stdout
  assert "--multiframe {first,refuse}" in help_text
