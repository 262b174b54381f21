"""Shared pytest fixtures.

Data from outside the repository comes through ONE mechanism, `external_path`: each item has
an environment variable (and a default beside the repository root, `../shared/...`); a test
that needs an absent item skips with a reason naming the variable. A fresh clone without
`../shared` runs every other test.

| fixture | variable | default |
|---|---|---|
| `nih_metadata_dir` | `LSEMIL_NIH_METADATA` | `../shared/data/nih_metadata` |
| `nih_samples_dir` | `LSEMIL_NIH_SAMPLES` | `../shared/data/nih_samples` |
| `paper_md` | `LSEMIL_PAPER_MD` | `../shared/reference/paper.md` |

Helpers shared by several test modules are fixtures too (`write_nih_folder`,
`phantom_image`, `random_variables`, `write_checkpoint`, `write_dicom`, `fast_compiles`,
`report_inputs`, `script_result`, the real NIH index `nih` and its expected counts
`nih_expected`; the `lsemil` subprocess runner of tests/system/conftest.py), never imports of
another test module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# One persistent XLA compilation cache for the whole run: every test process and every
# `lsemil` subprocess it starts (they inherit the environment) compiles a given program
# once. Most of the suite's time is the same smoke-config steps compiled again in each
# real-process test; a cache hit returns the identical executable, so results do not change.
# The size limit turns on jax's file lock, so concurrent writers and readers are safe.
_CACHE_ENV = {
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
  "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
}


def pytest_configure(config) -> None:
  if hasattr(config, "workerinput") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return  # an xdist worker inherits the controller's; a cache given by the user is kept
  cache = tempfile.mkdtemp(prefix="lsemil-test-jax-cache-")
  config._lsemil_jax_cache = cache
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  for key, value in _CACHE_ENV.items():
    os.environ.setdefault(key, value)


def pytest_unconfigure(config) -> None:
  cache = getattr(config, "_lsemil_jax_cache", None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)


def external_path(variable: str, default: Path, *, must_hold: str | None = None) -> Path:
  """The path named by `variable` (else `default`), or skip naming the variable."""
  path = Path(os.environ.get(variable) or default)
  ok = path.is_dir() and any(path.glob(must_hold)) if must_hold else path.exists()
  if not ok:
    what = f" (no {must_hold} there)" if must_hold and path.exists() else ""
    pytest.skip(f"external test data not found at {path}{what}: set {variable}")
  return path


@pytest.fixture(scope="session")
def nih_metadata_dir() -> Path:
  """The real NIH ChestX-ray14 metadata folder (CSV and list files, no images)."""
  return external_path(
    "LSEMIL_NIH_METADATA", SHARED / "data" / "nih_metadata", must_hold="Data_Entry_2017*.csv*"
  )


@pytest.fixture(scope="session")
def nih(nih_metadata_dir):
  """The NihIndex of the real NIH metadata (lsemil.data.nih.load_index), loaded once."""
  from lsemil.data.nih import load_index

  return load_index(nih_metadata_dir)


@pytest.fixture(scope="session")
def nih_expected() -> SimpleNamespace:
  """The expected counts on the real Data_Entry_2017_v2020.csv: `test_positives` (per class,
  in NIH order) and `boxes` (per box class)."""
  return SimpleNamespace(
    test_positives=[3279, 1069, 4658, 6112, 1748, 1623, 555, 2665, 1815, 925, 1093, 435, 1143,
                    86],
    boxes={"Atelectasis": 180, "Cardiomegaly": 146, "Effusion": 153, "Infiltration": 123,
           "Mass": 85, "Nodule": 79, "Pneumonia": 120, "Pneumothorax": 98},
  )


@pytest.fixture(scope="session")
def nih_samples_dir() -> Path:
  """A folder with real NIH PNGs (00000001_000.png, 00027426_000.png)."""
  return external_path("LSEMIL_NIH_SAMPLES", SHARED / "data" / "nih_samples", must_hold="*.png")


@pytest.fixture(scope="session")
def paper_md() -> Path:
  """The paper as Markdown (its Tables 1-3 are parsed by lsemil.reporting.paper_tables)."""
  return external_path("LSEMIL_PAPER_MD", SHARED / "reference" / "paper.md")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
  """A small synthetic NIH-layout dataset (40 patients, 512 px, seed 0), built once."""
  from lsemil.data.phantoms import synthesize

  out = tmp_path_factory.mktemp("synth") / "nih"
  return synthesize(out, patients=40, size=512, seed=0, workers=1)


# --------------------------------------------------------------------------- shared helpers

NIH_TEST_BOX = ("100", "200", "300", "400")


def phantom(seed: int, size: int = 1024) -> np.ndarray:
  """A chest-like smooth gradient with fine noise texture, uint8."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  base = 60 + 120 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.08)
  noise = cv2.GaussianBlur(rng.normal(0, 25, (size, size)), (0, 0), 1.5)
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _write_nih_folder(
  root: Path, *, patients: int = 8, per_patient: int = 2, size: int = 1024, same: bool = False
) -> list[str]:
  """A raw NIH-layout folder: images/, Data_Entry, the two lists, one box; returns image ids."""
  (root / "images").mkdir(parents=True)
  ids, lines = [], ["Image Index,Finding Labels,Follow-up #,Patient ID"]
  for p in range(1, patients + 1):
    for k in range(per_patient):
      image_id = f"{p:08d}_{k:03d}.png"
      ids.append(image_id)
      img = phantom(0 if same else len(ids), size)
      cv2.imwrite(str(root / "images" / image_id), img)
      label = ["No Finding", "Cardiomegaly", "Effusion|Mass"][p % 3 if p < patients else 2]
      lines.append(f"{image_id},{label},{k},{p}")
  (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
  n_test = 2 * per_patient
  (root / "train_val_list.txt").write_text("\n".join(ids[:-n_test]) + "\n")
  (root / "test_list.txt").write_text("\n".join(ids[-n_test:]) + "\n")
  (root / "BBox_List_2017.csv").write_text(
    "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    + f"{ids[-1]},Effusion,{','.join(NIH_TEST_BOX)}\n"
  )
  return ids


@pytest.fixture(scope="session")
def phantom_image():
  """fn(seed, size=1024) -> uint8 (size, size): a chest-like gradient with noise texture."""
  return phantom


@pytest.fixture(scope="session")
def write_nih_folder():
  """fn(root, *, patients=8, per_patient=2, size=1024, same=False) -> image ids: writes a raw
  NIH-layout folder with phantom images (the last image has one Effusion box)."""
  return _write_nih_folder


def _random_variables(model, seed: int = 0) -> dict:
  """Deterministic random weights without compiling `model.init` (slow on 2 CPU cores).

  Kernels ~ N(0, 1/fan_in), norm scales and running variances 1, everything else 0.
  """
  import jax

  from lsemil.models import mil

  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: mil.init_variables(model, jax.random.key(0)))

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _write_checkpoint(workdir, config, variables, step: int) -> None:
  """A training workdir whose one checkpoint holds `variables` (as `lsemil train` saves)."""
  import grain
  import jax

  from lsemil.models import registry
  from lsemil.runtime import checkpointing
  from lsemil.training import trainer

  model = registry.from_config(config.model, saved=True)  # MIL or GAP, as the config says
  abstract = trainer.abstract_state(model, trainer.create_optimizer(config), 0)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  state = state.replace(
    step=np.int32(step), params=variables["params"], batch_stats=variables["batch_stats"]
  )
  manager = checkpointing.create_manager(workdir, keep=1, async_save=False)
  it = iter(grain.MapDataset.range(8).batch(2).to_iter_dataset())
  checkpointing.save(
    manager, step, state, it, config=config, meta={}, metrics={checkpointing.BEST_METRIC: 0.5}
  )
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope="session")
def write_checkpoint():
  """fn(workdir, config, variables, step): a workdir with one real checkpoint of `variables`
  (best metric 0.5), as `lsemil train` saves it; no training."""
  return _write_checkpoint


@pytest.fixture(scope="module")
def fast_compiles():
  """Cheaper XLA CPU compiles (jax_disable_most_optimizations) for the module that asks,
  with `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  import jax

  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _fake_xray(rng, n=96) -> np.ndarray:
  yy, xx = np.mgrid[0:n, 0:n] / n
  return np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 4) + 0.1 * rng.random((n, n))


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory):
  """fn(n_items=5) -> {tables, figures, gallery}, keywords of html_page.write_report:
  a Table 3 in Markdown and a raw HTML table, real ROC and reliability PNGs (made once for the
  module), and `n_items` gallery items (fake X-rays, random saliency of two runs)."""
  from lsemil.metrics import classification
  from lsemil.reporting import html_page, paper_tables, plots

  src = tmp_path_factory.mktemp("src")
  rng = np.random.default_rng(0)
  y = rng.random((120, 14)) < 0.25
  probs = [1 / (1 + np.exp(-(2 * y + rng.normal(size=y.shape) - 2))) for _ in range(2)]
  runs = [("r0=5", probs[0]), ("r0=10", probs[1])]
  plots.roc_curves(src / "roc.png", y, runs)
  plots.reliability_diagrams(src / "rel.png", y, runs)
  md, _ = paper_tables.table3(
    [{"label": lb, "auc": classification.per_class_auc(y, p)} for lb, p in runs]
  )

  def make(n_items: int = 5):
    rng = np.random.default_rng(0)
    classes = ["Mass", "Nodule", "Atelectasis", "Mass", "Pneumonia", "Effusion", "Nodule"]
    gallery = []
    for i in range(n_items):
      boxes = [[100 + 60 * i, 200, 300, 250]]
      sal = {lb: rng.random((8, 8)) for lb in ("r0=5", "r0=10")}
      gallery.append(
        html_page.gallery_item(
          _fake_xray(rng), boxes, classes[i % len(classes)], sal, size=96, caption=f"img{i}.png"
        )
      )
    tables = [("Table 3", md + "\nBold: best of our runs.\n"), ("Raw", "<p id='raw'>x</p>")]
    figures = [("ROC curves", src / "roc.png"), ("Reliability", src / "rel.png")]
    return {"tables": tables, "figures": figures, "gallery": gallery}

  return make


def _script_result(code: str, *args, env: dict, timeout: float = 300) -> tuple[dict, str]:
  """`python -c code *args` in the repository root, which must exit 0: the JSON its last
  `RESULT ` line prints, and its whole output."""
  argv = [sys.executable, "-c", code, *map(str, args)]
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO_ROOT,
                        timeout=timeout)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :]), proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def script_result():
  """fn(code, *args, env, timeout=300) -> (result, output): runs a driver script `python -c
  code *args` (it prints `RESULT <json>`) in the repository root; it must exit 0."""
  return _script_result


@pytest.fixture(scope="session")
def random_variables():
  """fn(model, seed=0) -> {'params', 'batch_stats'?}: random weights, no init compile."""
  return _random_variables


def _write_dicom(path, raw, *, photometric="MONOCHROME2", shape=None, **elements) -> Path:
  """`raw` (uint8 / uint16, (H, W) or (frames, H, W)) as a DICOM file (explicit VR little
  endian); `shape` = (rows, columns) claimed in the header instead of raw's; `elements`
  (keyword=value, None for a zero-length element) are set last."""
  pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

  raw = np.asarray(raw)
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
  ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 1, photometric
  ds.Rows, ds.Columns = shape or raw.shape[-2:]
  if raw.ndim == 3:
    ds.NumberOfFrames = raw.shape[0]
  bits = 8 * raw.dtype.itemsize
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
  for key, value in elements.items():
    setattr(ds, key, value)
  ds.PixelData = raw.astype(raw.dtype.newbyteorder("<")).tobytes()
  ds.save_as(path, enforce_file_format=True)
  return Path(path)


@pytest.fixture(scope="session")
def write_dicom():
  """fn(path, raw, *, photometric='MONOCHROME2', shape=None, **elements) -> path: a DICOM
  file of `raw` (needs pydicom: skips without it)."""
  return _write_dicom


# --------------------------------------------------------------------------- GCS server

GCS_BUCKET = "lsemil-test"


@pytest.fixture(scope="session")
def gcs_bucket():
  """ "gs://lsemil-test" on a real GCS JSON API server (fake-gcs-server) on 127.0.0.1,
  started once per test run. The clients' variables (gcsfs, orbax's tensorstore) are set
  in os.environ for the session, so CLI subprocesses inherit them. Skips only where the
  server binary cannot run."""
  from gcs_server import GcsServer, ServerUnavailable

  try:
    server = GcsServer.start()
  except ServerUnavailable as e:
    pytest.skip(f"no local GCS server: {e}")
  server.create_bucket(GCS_BUCKET)
  env = server.client_env()
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield f"gs://{GCS_BUCKET}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.stop()
