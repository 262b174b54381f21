"""Tests of `lsemil predict` (per-image probabilities and saliency overlays, Sec 3.6 and 4.4).

A smoke-sized model with deterministic random weights stands in for a trained one; the CLI
tests read it from a real checkpoint (`checkpointing.save`, no training). Images come from
the `synth_dir` fixture.

`lsemil predict --boxes` (the IoBB protocol's boxes) and `--calibration` (a fitted recalibration).

The geometry is tested through `prediction.predict_files` on a model whose saliency we control
(its map is its own input, so a bright planted lesion is the map's blob): the box must come back
in the input file's own pixels, on non-square files below and above 512 px. The CLI is tested on
a real checkpoint (random smoke weights, `checkpointing.save`): boxes.json equals
`localization.boxes_from_map` of the maps the one inference path gives, and --calibration
applies the parameters `evaluate --calibrate` writes.
"""

from __future__ import annotations

import csv
import io
import json
import weakref

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from lsemil.commands import cli
from lsemil.core import configuration, errors
from lsemil.data import dicom, imageio, nih, pipeline
from lsemil.data.nih import CLASSES
from lsemil.inference import engine
from lsemil.inference.trained_model import TrainedModel
from lsemil.metrics import calibration, localization
from lsemil.models import mil, registry
from lsemil.workflows import prediction

# Cheaper XLA CPU compiles for this module (flax's example tests do the same).
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def smoke(synth_dir, random_variables):
  """An `engine.LoadedModel` of the smoke config with random weights (seed 1)."""
  config = configuration.load_config("smoke")
  config.data.data_dir = str(synth_dir)
  model = mil.from_config(config.model)
  variables = random_variables(model, seed=1)
  return engine.LoadedModel(config, model, variables, 4, "W/checkpoints/4", {})


@pytest.fixture(scope="module")
def workdir(smoke, tmp_path_factory, write_checkpoint):
  """A training workdir holding `smoke`'s weights as its one checkpoint (step 4)."""
  w = tmp_path_factory.mktemp("run") / "w"
  write_checkpoint(w, smoke.config, smoke.variables, 4)
  return w


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
  config = smoke.config
  batch = next(iter(pipeline.make_eval_iter(config, synth_dir, "test")))
  index = nih.open_index(synth_dir, val_fraction=0.25, split_seed=0)
  row = int(batch["row"][0])
  x = engine.model_input(prediction.read_image(index.image_paths[row]), 64)
  assert x.dtype == np.uint8 and x.shape == (64, 64, 1)
  np.testing.assert_array_equal(x, batch["image"][0])
  # A raw 1024 px image is brought to 512 first, exactly as `lsemil prepare` stores it.
  big = cv2.resize(prediction.read_image(index.image_paths[row]), (1024, 1024))
  np.testing.assert_array_equal(
    engine.model_input(big, 64), engine.model_input(imageio.resize_gray(big, 512), 64)
  )
  with pytest.raises(ValueError, match="uint8"):
    engine.model_input(big.astype(np.float32), 64)


def test_png_jpeg_overlays_csv_and_a_broken_file(smoke, files, tmp_path, capsys):
  probe, _ = prediction.predict_files(smoke, [str(files["png"])], None, progress=False)
  p = np.array([probe[0]["probs"][c] for c in CLASSES])
  threshold = float(np.sort(p)[-2])  # at least the top two classes get overlays
  paths = [str(files["png"]), str(files["bad"]), str(files["jpg"])]
  out = tmp_path / "P"
  rows, failures = prediction.predict_files(
    smoke, paths, out, threshold=threshold, batch_size=2, progress=False
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
  # predictions.csv: the per-image columns of every command, then the path and the classes
  # at or above the threshold.
  text = (out / "predictions.csv").read_text()
  header = next(csv.reader(io.StringIO(text)))
  assert header == [*engine.csv_columns(CLASSES), "path", f"classes_p>={threshold:g}"]
  table = list(csv.DictReader(io.StringIO(text)))
  assert [t["path"] for t in table] == [r["path"] for r in rows]
  assert [t["image_id"] for t in table] == ["chest.png", "chest_copy.jpg"]
  assert all(t["patient_id"] == "" for t in table)
  for t, r in zip(table, rows, strict=True):
    for c in CLASSES:
      assert float(t[c]) == pytest.approx(r["probs"][c], abs=1e-6)
      assert 0.0 <= float(t[c]) <= 1.0
    above = [c for c in CLASSES if r["probs"][c] >= threshold]
    assert t[f"classes_p>={threshold:g}"].split("|") == above
  back = engine.read_predictions_csv(out / "predictions.csv")
  np.testing.assert_allclose(
    back["chest.png"], [rows[0]["probs"][c] for c in CLASSES], rtol=1e-7
  )
  # JPEG (quality 95) of the same pixels: nearly the same probabilities.
  for c in CLASSES:
    assert rows[0]["probs"][c] == pytest.approx(rows[1]["probs"][c], abs=0.02)
  # The first image's probabilities do not depend on the batch it ran in.
  assert rows[0]["probs"] == pytest.approx(probe[0]["probs"], abs=1e-5)


def test_cli_exit_status_and_table(smoke, workdir, files, tmp_path, capsys):
  out = tmp_path / "P"
  argv = ["predict", "--checkpoint", str(workdir), str(files["png"]), "--out", str(out)]
  assert cli.main([*argv, "--no-progress", "--threshold", "1.0"]) == 0
  captured = capsys.readouterr()
  assert "chest.png" in captured.out and "Atel" in captured.out
  assert f"{workdir / 'checkpoints' / '4'} (step 4)" in captured.err
  assert (out / "predictions.csv").is_file() and not list(out.glob("*.png"))
  # The checkpoint's probabilities are those of the weights it was written from.
  direct, _ = prediction.predict_files(smoke, [str(files["png"])], None, progress=False)
  got = engine.read_predictions_csv(out / "predictions.csv")["chest.png"]
  np.testing.assert_allclose(got, [direct[0]["probs"][c] for c in CLASSES], atol=1e-6)
  rc = cli.main(
    ["predict", "--checkpoint", str(workdir), str(files["bad"]), str(files["jpg"])]
    + ["--out", str(out), "--no-progress"]
  )
  assert rc == 1
  captured = capsys.readouterr()
  assert "broken.png" in captured.err and "chest_copy.jpg" in captured.out
  with pytest.raises(SystemExit) as e:  # argparse: exit 2
    cli.main(["predict", "--checkpoint", str(workdir), str(files["png"]), "--threshold", "2"])
  assert e.value.code == 2
  # No checkpoint there: one line naming the folder, exit 1.
  assert cli.main(["predict", "--checkpoint", str(tmp_path / "none"), str(files["png"])]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("lsemil predict: ") and str(tmp_path / "none") in err[-1]


# A 12-bit X-ray as a modality stores it: rescaled (slope 2, intercept -100).
XRAY_ELEMENTS = {"BitsStored": 12, "HighBit": 11, "RescaleSlope": 2, "RescaleIntercept": -100}


def test_dicom_monochrome1_rescale_window_and_predict(smoke, tmp_path, write_dicom):
  rng = np.random.default_rng(0)
  raw = rng.integers(0, 4096, size=(96, 80)).astype(np.uint16)
  raw[0, 0], raw[0, 1] = 0, 4095
  path = tmp_path / "xray.dcm"
  window = {"WindowCenter": 1000.0, "WindowWidth": 2000.0}
  write_dicom(path, raw, photometric="MONOCHROME1", **window, **XRAY_ELEMENTS)
  img = dicom.read_dicom(path)
  x = raw.astype(np.float64) * 2 - 100  # modality rescale
  y = np.clip((x - 999.5) / 1999.0 + 0.5, 0, 1)  # DICOM linear window c=1000, w=2000
  expected = np.rint((1 - y) * 255).astype(np.uint8)  # MONOCHROME1: inverted
  assert img.dtype == np.uint8 and img.shape == raw.shape
  np.testing.assert_array_equal(img, expected)
  assert img[0, 0] == 255 and img[0, 1] == 0  # low raw = bright in MONOCHROME1
  # Without a window: min-max; MONOCHROME2 is not inverted. Detection by the DICM magic.
  plain = tmp_path / "plain.bin"
  write_dicom(plain, raw, **XRAY_ELEMENTS)
  assert dicom.is_dicom(plain)
  img2 = prediction.read_image(plain)
  np.testing.assert_array_equal(img2, np.rint(raw / 4095.0 * 255).astype(np.uint8))
  rows, failures = prediction.predict_files(smoke, [str(path)], None, progress=False)
  assert not failures and len(rows) == 1
  garbage = tmp_path / "garbage.dcm"
  garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 40)
  with pytest.raises(errors.ImageError, match="garbage.dcm"):
    prediction.read_image(garbage)


# ------------------------------------------------------- predict --boxes and --calibration

LESION = 200  # grey level of the planted lesion; background 20 (saliency 0.78 vs 0.08)


class InputIsSaliency(nn.Module):
  """A 'model' with the MIL contract whose class-0 map is its input (class 1: mirrored left
  to right, the other classes 0) and whose probability is the map's maximum."""

  input_size: int = 256

  @nn.compact
  def __call__(self, x, train: bool):
    s = x.astype(jnp.float32)[..., 0] / 255.0  # (B, S, S)
    maps = jnp.zeros((*s.shape, len(CLASSES)), jnp.float32)
    maps = maps.at[..., 0].set(s).at[..., 1].set(s[:, :, ::-1])
    return {"probs": maps.max(axis=(1, 2)), "saliency": maps}


def planted(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
  x, y, bw, bh = box
  img = np.full((h, w), 20, np.uint8)
  img[y : y + bh, x : x + bw] = LESION
  return img


@pytest.mark.parametrize(
  "hw, box, tol",
  [
    ((300, 480), (300, 60, 80, 75), 2.0),  # below 512: stretched to the square input
    ((1000, 760), (90, 610, 150, 220), 2.0),  # above 512: prepared at 512 first
  ],
)
def test_planted_lesion_box_in_the_files_own_pixels(tmp_path, monkeypatch, hw, box, tol):
  from lsemil.reporting import drawing

  drawn, overlay_png = {}, drawing.overlay_png

  def keep(path, *args, **kwargs):
    drawn[path.name] = overlay_png(path, *args, **kwargs)
    return drawn[path.name]

  monkeypatch.setattr(drawing, "overlay_png", keep)
  h, w = hw
  path = tmp_path / "lesion.png"
  assert cv2.imwrite(str(path), planted(h, w, box))
  config = configuration.load_config("smoke")  # no model.arch: a MIL run ('model' saliency)
  loaded = engine.LoadedModel(config, InputIsSaliency(), {}, 0, "none", {})
  rows, failures = prediction.predict_files(
    loaded, [str(path)], tmp_path / "P", threshold=0.5, boxes=True, box_tau=0.5, progress=False
  )
  assert failures == [] and len(rows) == 1
  got = json.loads((tmp_path / "P" / prediction.BOXES_FILE).read_text())
  assert list(got) == ["lesion.png"] and set(got["lesion.png"]) == {CLASSES[0], CLASSES[1]}
  assert got["lesion.png"] == rows[0]["boxes"]
  x, y, bw, bh = box
  for cls, want_x in ((CLASSES[0], x), (CLASSES[1], w - x - bw)):  # class 1: mirrored
    (b,) = got["lesion.png"][cls]
    assert abs(b["x"] - want_x) <= tol and abs(b["y"] - y) <= tol, (cls, b)
    assert abs(b["w"] - bw) <= tol and abs(b["h"] - bh) <= tol, (cls, b)
    assert b["peak"] == pytest.approx(LESION / 255, abs=0.02)
    assert 0.5 <= b["mean"] <= b["peak"] + 1e-9
  # The overlays and the CSV are written for the same classes.
  assert rows[0]["overlays"] == [f"lesion_{CLASSES[0]}.png", f"lesion_{CLASSES[1]}.png"]
  # Each overlay shows its class's boxes, scaled from the file onto the 512 px image shown.
  for cls in (CLASSES[0], CLASSES[1]):
    (b,), (rect,) = got["lesion.png"][cls], drawn[f"lesion_{cls}.png"].axes[0].patches
    assert rect.get_xy() == pytest.approx((b["x"] * 512 / w - 0.5, b["y"] * 512 / h - 0.5))
    assert (rect.get_width(), rect.get_height()) == pytest.approx((b["w"] * 512 / w,
                                                                  b["h"] * 512 / h))


def test_no_box_below_tau_and_none_for_classes_below_the_threshold(tmp_path):
  path = tmp_path / "flat.png"
  assert cv2.imwrite(str(path), planted(200, 300, (50, 40, 30, 20)))
  loaded = engine.LoadedModel(
    configuration.load_config("smoke"), InputIsSaliency(), {}, 0, "none", {}
  )
  rows, _ = prediction.predict_files(
    loaded, [str(path)], None, threshold=0.5, boxes=True, box_tau=0.9, progress=False
  )
  # The lesion's 0.78 stays below tau = 0.9: the classes are listed, with no boxes.
  assert rows[0]["boxes"] == {CLASSES[0]: [], CLASSES[1]: []}
  rows, _ = prediction.predict_files(
    loaded, [str(path)], None, threshold=0.9, boxes=True, progress=False
  )
  assert rows[0]["boxes"] == {}


def test_the_progress_bar_ends_after_the_last_forward(tmp_path, monkeypatch):
  """The 'predict' bar (and so its images/s) covers every batch's forward, the last,
  partial batch's included, not only the reading of the files."""
  paths = []
  for k in range(3):
    paths.append(str(tmp_path / f"{k}.png"))
    assert cv2.imwrite(paths[-1], planted(64, 64, (8, 8, 8, 8)))
  events, forward = [], engine.Predictor.predict_images

  def logged(self, *args, **kwargs):
    events.append("forward")
    return forward(self, *args, **kwargs)

  monkeypatch.setattr(engine.Predictor, "predict_images", logged)
  loaded = engine.LoadedModel(
    configuration.load_config("smoke"), InputIsSaliency(), {}, 0, "none", {}
  )
  prediction.predict_files(
    loaded, paths, None, batch_size=2, progress=lambda *a: events.append(a[1:3])
  )
  assert events == [(0, 3), (1, 3), "forward", (2, 3), "forward", (3, 3)]


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def smoke_workdir(random_variables, tmp_path_factory, write_checkpoint):
  """A training workdir with random smoke weights as its one checkpoint (step 2)."""
  config = configuration.load_config("smoke")
  model = registry.from_config(config.model, saved=True)  # with or without model.arch
  w = tmp_path_factory.mktemp("boxes") / "w"
  write_checkpoint(w, config, random_variables(model, seed=3), 2)
  return w


def test_cli_boxes_and_calibration_on_a_checkpoint(smoke_workdir, tmp_path, capsys):
  img = planted(240, 320, (200, 30, 60, 90))
  path = tmp_path / "chest.png"
  assert cv2.imwrite(str(path), img)
  temps = [0.5 + 0.1 * k for k in range(len(CLASSES))]
  cal_file = tmp_path / "cal.json"
  cal_file.write_text(
    json.dumps({"method": "temperature", "classes": CLASSES, "temperature": temps})
  )
  out = tmp_path / "P"
  argv = ["predict", "--checkpoint", str(smoke_workdir), str(path), "--out", str(out)]
  argv += ["--boxes", "--box-tau", "0.5", "--threshold", "0", "--calibration", str(cal_file)]
  assert cli.main([*argv, "--no-progress"]) == 0
  assert "boxes in" in capsys.readouterr().err
  boxes = json.loads((out / prediction.BOXES_FILE).read_text())["chest.png"]
  probs = engine.read_predictions_csv(out / "predictions.csv")["chest.png"]

  loaded = engine.load(smoke_workdir)
  x = engine.model_input(img, loaded.model.input_size)[None]
  direct = engine.Predictor(loaded.model, loaded.variables).predict_images(x, 1, saliency=True)
  want_p = calibration.apply({"method": "temperature", "temperature": temps}, direct["probs"])[0]
  np.testing.assert_allclose(probs, want_p, atol=1e-6)
  assert not np.allclose(probs, direct["probs"][0], atol=1e-3)  # the calibration changed them
  assert set(boxes) == set(CLASSES)  # threshold 0: every class
  for k, cls in enumerate(CLASSES):
    want = localization.boxes_from_map(direct["saliency"][0, ..., k], 0.5, img.shape)
    assert len(boxes[cls]) == len(want)
    for b, v in zip(boxes[cls], want, strict=True):
      assert b == pytest.approx(v, abs=1e-6)
      assert 0 <= b["x"] and b["x"] + b["w"] <= 320 + 1e-6 and b["y"] + b["h"] <= 240 + 1e-6


def test_cli_refuses_bad_calibration_and_a_gap_source_on_a_mil_run(smoke_workdir, tmp_path, capsys):
  path = tmp_path / "x.png"
  assert cv2.imwrite(str(path), planted(64, 64, (10, 10, 8, 8)))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"method": "temperature", "temperature": [1.0, 2.0]}))
  base = ["predict", "--checkpoint", str(smoke_workdir), str(path), "--out", str(tmp_path / "P")]
  assert cli.main([*base, "--calibration", str(bad)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(bad) in err[0] and "temperature" in err[0]
  assert cli.main([*base, "--saliency", "gradcam"]) == 1
  err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lsemil predict:")]
  assert len(err) == 1 and "--saliency gradcam" in err[0] and "MIL" in err[0]
  assert not (tmp_path / "P" / "predictions.csv").exists()  # refused before any output


# --------------------------------------------------------------------------- the box protocols


def test_small_map_scoring_equals_the_full_grid():
  """`localization.score_case` on a replicated small map (the fast path every model map takes
  at 512) gives the full 512 x 512 grid's values: ties, constant and all-zero maps included."""
  import scipy.ndimage

  rng = np.random.default_rng(0)
  cfg = {
    "size": 512,
    "taus": localization.DEFAULT_TAUS,
    "ts": localization.DEFAULT_TS,
    "thresholds": localization.MIOU_THRESHOLDS,
    "method": "nearest",
  }
  for i in range(25):
    n = (8, 16, 32, 64, 128)[i % 5]
    s = localization.minmax(scipy.ndimage.gaussian_filter(rng.random((n, n)), 1.0))
    s = [s, np.round(s * 4) / 4, np.full((n, n), 0.3), np.zeros((n, n)), 0.2 * s][i // 5]
    boxes = tuple(
      tuple(float(v) for v in (*rng.uniform(0, 400, 2), *rng.uniform(4, 150, 2)))
      for _ in range(1 + i % 2)
    )
    case = localization.Case(0, 0, boxes, 1)
    fast = localization.score_case(s, case, 512.0, cfg)
    full = localization.score_case(s, case, 512.0, cfg, blocks=False)
    assert fast.keys() == full.keys()
    for k, v in full.items():
      if k == "ap":
        for a, b in zip(fast[k], v, strict=True):
          np.testing.assert_array_equal(a, b)
      else:
        np.testing.assert_allclose(fast[k], v, rtol=0, atol=1e-12, err_msg=f"{k} map {i}")
  with pytest.raises(ValueError, match="replication"):
    localization.score_case(np.zeros((12, 12)), case, 512.0, cfg, blocks=True)


def test_predict_files_streams_its_inputs(smoke, files, tmp_path, monkeypatch):
  """No decoded image outlives its batch: memory stays flat however many files are given."""
  live, peak = [], [0]

  def counting(fn):
    def wrapper(*args, **kwargs):
      got = fn(*args, **kwargs)
      peak[0] = max(peak[0], sum(ref() is not None for ref in live))
      live.append(weakref.ref(got))
      return got

    return wrapper

  monkeypatch.setattr(engine, "model_input", counting(engine.model_input))
  monkeypatch.setattr(pipeline, "prepared_image", counting(pipeline.prepared_image))
  paths = [str(files["png"])] * 24
  rows, failures = prediction.predict_files(
    smoke, paths, tmp_path / "P", threshold=1.0, batch_size=2, progress=False
  )
  assert len(rows) == 24 and not failures and len(live) >= 24
  assert peak[0] <= 8, peak[0]  # a batch or two of model inputs (and prepared images)
  assert len(list(csv.DictReader((tmp_path / "P" / "predictions.csv").open()))) == 24


# ------------------------------------------------------- the class list is the checkpoint's


def test_a_checkpoint_of_three_custom_classes_names_the_columns(
  files, random_variables, write_checkpoint, tmp_path
):
  config = configuration.load_config("smoke")
  names = ("Opacity", "Tube", "Normal")
  with config.unlocked():
    config.data.source, config.data.classes, config.model.num_classes = "csv", names, 3
  w = tmp_path / "w"
  write_checkpoint(w, config, random_variables(mil.from_config(config.model), seed=2), 3)
  loaded = engine.load(w)
  assert TrainedModel(loaded).classes == names
  rows, _ = prediction.predict_files(
    loaded, [str(files["png"])], tmp_path / "P", threshold=0.0, overlays=False
  )
  header = next(csv.reader(io.StringIO((tmp_path / "P" / "predictions.csv").read_text())))
  assert header == ["image_id", "patient_id", *names, "path", "classes_p>=0"]
  assert list(rows[0]["probs"]) == list(names)
  assert engine.read_predictions_csv(tmp_path / "P" / "predictions.csv")["chest.png"].shape == (3,)
  table = prediction.format_table(rows, 0.5, names)
  assert "Opac=Opacity, Tube=Tube, Norm=Normal" in table
  assert prediction.short_names(["Pneumonia", "Pneumothorax", "Pn"]) == {
    "Pneumonia": "Pneu", "Pneumothorax": "Pnex", "Pn": "Pn"}  # fmt: skip
