"""One inference path: predict, evaluate, reproduce and validation agree on their OUTPUTS.

One smoke model is trained through the real CLI (`lsemil train`, self-synthesized data);
then, for the same images, the probabilities of

  (a) `lsemil predict` on the image files,
  (b) `lsemil evaluate`'s per-image CSV,
  (c) validation inside training (W/validation_predictions.csv),
  (d) `lsemil reproduce` (its evaluation's per-image CSV)

agree to 1e-6, also on a dataset prepared at 256 px (whose images predict must not resize to
512 first: the demo's case), and a DICOM file's model input equals its PNG's.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lsemil.data import imageio, nih
from lsemil.inference import engine
from lsemil.workflows import prediction

TOL = 1e-6


def split_ids(data_dir: Path, split: str) -> list[str]:
  index = nih.open_index(data_dir, val_fraction=nih.VALID_FRACTION, split_seed=0)
  return [index.image_ids[r] for r in index.rows(split)]


def max_diff(a: dict, b: dict) -> float:
  assert set(b) <= set(a), f"ids missing: {sorted(set(b) - set(a))[:3]}"
  return max(float(np.max(np.abs(a[i] - b[i]))) for i in b)


def evaluate(lsemil, workdir: Path, out: Path, *args) -> dict:
  """`lsemil evaluate` of the last checkpoint (no bootstrap) into `out`: its per-image CSV."""
  lsemil("evaluate", "--workdir", workdir, "--which", "latest", "--n-boot", "0", "--out", out,
         "--no-progress", *args)  # fmt: skip
  return engine.read_predictions_csv(out.with_name(out.stem + "_predictions.csv"))


def predict(lsemil, workdir: Path, out: Path, files: list[str], *args) -> dict:
  """`lsemil predict` of the last checkpoint on `files` into `out`: its predictions CSV."""
  lsemil("predict", "--checkpoint", workdir, "--which", "latest", "--out", out, "--no-progress",
         *args, *files)  # fmt: skip
  return engine.read_predictions_csv(out / "predictions.csv")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, lsemil) -> Path:
  w = tmp_path_factory.mktemp("parity") / "run"
  lsemil("train", "--config", "configs/smoke.py", "--workdir", w)
  return w


def test_predict_evaluate_reproduce_validation_agree(workdir, tmp_path, lsemil):
  data = workdir / "data"
  # (b) evaluate, on the test split and on the valid split, of the last checkpoint.
  ev_test = evaluate(lsemil, workdir, tmp_path / "test.json")
  ev_valid = evaluate(lsemil, workdir, tmp_path / "valid.json", "--split", "valid")
  assert sorted(ev_test) == sorted(split_ids(data, "test"))
  assert sorted(ev_valid) == sorted(split_ids(data, "valid"))

  # (a) predict on the test images' own files.
  files = [str(data / "images" / i) for i in sorted(ev_test)]
  pred = predict(lsemil, workdir, tmp_path / "pred", files, "--batch-size", "5")
  assert len(pred) == len(files)
  assert max_diff(ev_test, pred) < TOL

  # (c) validation inside training: its last evaluation is of the last checkpoint.
  val = engine.read_predictions_csv(workdir / "validation_predictions.csv")
  assert sorted(val) == sorted(ev_valid)
  assert max_diff(ev_valid, val) < TOL

  # (d) reproduce: its evaluation of the run writes the same per-image CSV.
  lsemil("reproduce", "--run", f"r0=5:{workdir}", "--which", "latest", "--n-boot", "0",
         "--figure-images", "1", "--out", tmp_path / "results", "--no-progress")  # fmt: skip
  rep = engine.read_predictions_csv(workdir / "evaluation_test_predictions.csv")
  assert max_diff(ev_test, rep) < TOL
  # The probabilities are not all alike (a constant model would pass the checks above).
  probs = np.stack(list(ev_test.values()))
  assert float(probs.std(axis=0).max()) > 1e-4


def test_predict_matches_evaluate_on_a_256px_prepared_dataset(workdir, tmp_path, lsemil):
  """The demo prepares at 256 px: predict must feed those files exactly as evaluate does."""
  prepared = tmp_path / "p256"
  lsemil("prepare", "--nih-dir", workdir / "data", "--out", prepared, "--size", "256",
         "--workers", "1")  # fmt: skip
  ev = evaluate(lsemil, workdir, tmp_path / "e.json", "--data-dir", prepared)
  files = [str(prepared / "images" / i) for i in sorted(ev)]
  assert imageio.read_gray(files[0]).shape == (256, 256)
  pred = predict(lsemil, workdir, tmp_path / "pred", files)
  assert max_diff(ev, pred) < TOL


def test_dicom_input_equals_png_input(workdir, tmp_path):
  pydicom = pytest.importorskip("pydicom")
  from pydicom.dataset import FileDataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, generate_uid

  png = sorted((workdir / "data" / "images").glob("*.png"))[0]
  gray = imageio.read_gray(png)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
  ds.Rows, ds.Columns = gray.shape
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
  ds.WindowCenter, ds.WindowWidth = 128.0, 256.0  # x -> x / 255: identity (PS3.3 C.11.2.1.2)
  ds.PixelData = gray.tobytes()
  ds.save_as(str(tmp_path / "x.dcm"), enforce_file_format=True)
  del pydicom

  loaded = engine.load(workdir, "latest")
  size = loaded.model.input_size
  (dcm_in, png_in), _, ok, failures = prediction.read_inputs([tmp_path / "x.dcm", png], size)
  assert failures == [] and ok == [0, 1]
  np.testing.assert_array_equal(dcm_in, png_in)
  assert dcm_in.dtype == np.uint8


def test_model_input_is_the_eval_pipeline(workdir):
  """model_input on a decoded file equals the eval pipeline's batch image for that row."""
  from lsemil.core import configuration
  from lsemil.data import pipeline

  config = configuration.load_config("smoke")
  config.data.data_dir = str(workdir / "data")
  batch = next(iter(pipeline.make_eval_iter(config, config.data.data_dir, "test")))
  ids = split_ids(workdir / "data", "test")
  gray = imageio.read_gray(workdir / "data" / "images" / ids[0])
  np.testing.assert_array_equal(
    engine.model_input(gray, config.model.input_size), np.asarray(batch["image"][0])
  )
  with pytest.raises(ValueError, match="uint8"):
    engine.model_input(gray.astype(np.float32), config.model.input_size)


def test_per_image_csv_columns(workdir, tmp_path, lsemil):
  evaluate(lsemil, workdir, tmp_path / "t.json")
  with open(tmp_path / "t_predictions.csv") as f:
    header = next(csv.reader(f))
  assert header == ["image_id", "patient_id", *nih.CLASSES]
