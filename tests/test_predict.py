"""Tests of `lsemil predict` (per-image probabilities and saliency overlays, Sec 3.6 and 4.4).

A smoke-sized model with deterministic random weights stands in for a checkpoint (the loader is
replaced in the CLI tests); images come from the `synth_dir` fixture.
"""

from __future__ import annotations

import csv
import io

import cv2
import numpy as np
import pytest
from PIL import Image
from test_evaluate import fast_variables  # random weights without compiling init

from lsemil import config_lib, predict
from lsemil import evaluate as ev
from lsemil import model as model_lib
from lsemil.data import imageio, pipeline
from lsemil.data.nih import CLASSES


@pytest.fixture(scope="module")
def smoke(synth_dir):
  config = config_lib.load_config("smoke")
  config.data.data_dir = str(synth_dir)
  model = model_lib.from_config(config.model)
  return config, model, fast_variables(model, seed=1)


@pytest.fixture(scope="module")
def files(synth_dir, tmp_path_factory):
  """A synthetic PNG, the same image as JPEG, and a truncated PNG."""
  d = tmp_path_factory.mktemp("imgs")
  src = sorted((synth_dir / "images").iterdir())[3]
  png = d / "chest.png"
  png.write_bytes(src.read_bytes())
  jpg = d / "chest_copy.jpg"
  cv2.imwrite(str(jpg), imageio.read_gray(png), [cv2.IMWRITE_JPEG_QUALITY, 95])
  bad = d / "broken.png"
  data = png.read_bytes()
  bad.write_bytes(data[: len(data) // 2])
  return {"png": png, "jpg": jpg, "bad": bad}


def test_model_input_matches_the_eval_pipeline(smoke, synth_dir):
  config = smoke[0]
  batch = next(iter(pipeline.make_eval_iter(config, synth_dir, "test")))
  index = ev.open_index(config, synth_dir)
  row = int(batch["row"][0])
  _, x = predict.model_input(predict.read_image(index.image_paths[row]), 64)
  np.testing.assert_array_equal(x, batch["image"][0])


def test_png_jpeg_overlays_csv_and_a_broken_file(smoke, files, tmp_path, capsys):
  config, model, variables = smoke
  probe, _ = predict.predict_files(
    config, model, variables, [str(files["png"])], None, progress=False
  )
  p = np.array([probe[0]["probs"][c] for c in CLASSES])
  threshold = float(np.sort(p)[-2])  # at least the top two classes get overlays
  paths = [str(files["png"]), str(files["bad"]), str(files["jpg"])]
  out = tmp_path / "P"
  rows, failures = predict.predict_files(
    config, model, variables, paths, out, threshold=threshold, batch_size=2, progress=False
  )
  assert [f[0] for f in failures] == [str(files["bad"])]
  assert "broken.png" in failures[0][1] and "truncated" in failures[0][1]
  assert "broken.png" in capsys.readouterr().err
  assert [r["path"] for r in rows] == [str(files["png"]), str(files["jpg"])]
  expected = set()
  for r in rows:
    stem = "chest" if r["path"].endswith(".png") else "chest_copy"
    expected |= {f"{stem}_{c}.png" for c in CLASSES if r["probs"][c] >= threshold}
  assert len(expected) >= 2
  assert {f.name for f in out.glob("*.png")} == expected
  for name in expected:
    with Image.open(out / name) as im:
      assert im.format == "PNG" and im.size[0] >= 200
  table = list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))
  assert [t["path"] for t in table] == [r["path"] for r in rows]
  for t, r in zip(table, rows, strict=True):
    for c in CLASSES:
      assert float(t[c]) == pytest.approx(r["probs"][c], abs=1e-6)
      assert 0.0 <= float(t[c]) <= 1.0
  # JPEG (quality 95) of the same pixels: nearly the same probabilities.
  for c in CLASSES:
    assert rows[0]["probs"][c] == pytest.approx(rows[1]["probs"][c], abs=0.02)
  # The first image's probabilities do not depend on the batch it ran in.
  assert rows[0]["probs"] == pytest.approx(probe[0]["probs"], abs=1e-5)


def test_cli_exit_status_and_table(smoke, files, tmp_path, monkeypatch, capsys):
  config, model, variables = smoke
  monkeypatch.setattr(
    ev, "load_checkpoint", lambda path, which="best": (config, model, variables, 4, {})
  )
  out = tmp_path / "P"
  ok = predict.main(
    [
      "--checkpoint",
      "W",
      str(files["png"]),
      "--out",
      str(out),
      "--no-progress",
      "--threshold",
      "1.0",
    ]
  )
  assert ok == 0
  captured = capsys.readouterr()
  assert "chest.png" in captured.out and "Atel" in captured.out
  assert (out / "predictions.csv").is_file() and not list(out.glob("*.png"))
  rc = predict.main(
    ["--checkpoint", "W", str(files["bad"]), str(files["jpg"]), "--out", str(out), "--no-progress"]
  )
  assert rc == 1
  captured = capsys.readouterr()
  assert "broken.png" in captured.err and "chest_copy.jpg" in captured.out
  assert predict.main(["--checkpoint", "W", str(files["png"]), "--threshold", "2"]) == 2


def _write_dicom(path, raw, *, photometric="MONOCHROME1", window=(1000.0, 2000.0)):
  pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.Rows, ds.Columns = raw.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = photometric
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.RescaleSlope, ds.RescaleIntercept = 2, -100
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = window
  ds.PixelData = raw.astype("<u2").tobytes()
  ds.save_as(path, enforce_file_format=True)
  assert pydicom.dcmread(path).PhotometricInterpretation == photometric


def test_dicom_monochrome1_rescale_window_and_predict(smoke, tmp_path):
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 4096, size=(96, 80)).astype(np.uint16)
  raw[0, 0], raw[0, 1] = 0, 4095
  path = tmp_path / "xray.dcm"
  _write_dicom(path, raw)
  img = predict.read_dicom(path)
  x = raw.astype(np.float64) * 2 - 100  # modality rescale
  y = np.clip((x - 999.5) / 1999.0 + 0.5, 0, 1)  # DICOM linear window c=1000, w=2000
  expected = np.rint((1 - y) * 255).astype(np.uint8)  # MONOCHROME1: inverted
  assert img.dtype == np.uint8 and img.shape == raw.shape
  np.testing.assert_array_equal(img, expected)
  assert img[0, 0] == 255 and img[0, 1] == 0  # low raw = bright in MONOCHROME1
  # Without a window: min-max; MONOCHROME2 is not inverted. Detection by the DICM magic.
  plain = tmp_path / "plain.bin"
  _write_dicom(plain, raw, photometric="MONOCHROME2", window=None)
  assert predict.is_dicom(plain)
  img2 = predict.read_image(plain)
  np.testing.assert_array_equal(img2, np.rint(raw / 4095.0 * 255).astype(np.uint8))
  config, model, variables = smoke
  rows, failures = predict.predict_files(
    config, model, variables, [str(path)], None, progress=False
  )
  assert not failures and len(rows) == 1
  garbage = tmp_path / "garbage.dcm"
  garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 40)
  with pytest.raises(imageio.ImageError, match="garbage.dcm"):
    predict.read_image(garbage)
