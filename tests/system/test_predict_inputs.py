"""`lsemil predict` on inputs that used to hang it or exhaust memory, and on a long list of
files killed part way (Reliability round 3): a FIFO, a device, a folder or a file larger than
any image lsemil accepts is skipped with one line naming it and why, the good files are still
predicted (exit status 1, as for any unreadable file); predictions.csv grows batch by batch,
so a killed run keeps the rows it finished."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from lsemil.core import configuration
from lsemil.data import imageio
from lsemil.data.nih import CLASSES
from lsemil.inference import engine
from lsemil.models import registry


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_variables, write_checkpoint) -> Path:
  """A smoke-config workdir with random weights as its one checkpoint."""
  config = configuration.load_config("smoke")
  model = registry.from_config(config.model, saved=True)
  w = tmp_path_factory.mktemp("predict_inputs") / "w"
  write_checkpoint(w, config, random_variables(model, seed=5), 1)
  return w


def _png(path: Path, seed: int = 0) -> Path:
  rng = np.random.default_rng(seed)
  assert cv2.imwrite(str(path), rng.integers(0, 256, (96, 96), dtype=np.uint8))
  return path


def _rows(out: Path) -> list[dict]:
  return list(csv.DictReader(io.StringIO((out / "predictions.csv").read_text())))


def test_fifo_device_folder_and_huge_sparse_file_are_skipped_by_name(tmp_path, workdir, lsemil):
  good, good2 = _png(tmp_path / "good.png"), _png(tmp_path / "good2.png", 1)
  fifo = tmp_path / "pipe.png"
  os.mkfifo(fifo)
  sparse = tmp_path / "huge.png"
  sparse.touch()
  os.truncate(sparse, 6 << 30)  # 6 GB of holes: costs no disk, would cost 6 GB read whole
  folder = tmp_path / "folder.png"
  folder.mkdir()
  out = tmp_path / "P"
  args = [good, fifo, "/dev/zero", sparse, folder, good2]
  # A FIFO used to block the run forever: the timeout turns a hang into a failure.
  proc = lsemil.run(
    "predict", "--checkpoint", workdir, *args, "--out", out, "--no-progress", "--threshold", "1",
    timeout=300,
  )  # fmt: skip
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  for path, why in [
    (fifo, "not a regular file (a FIFO)"),
    ("/dev/zero", "not a regular file (a character device)"),
    (folder, "not a regular file (a folder)"),
    (sparse, f"above the limit of {imageio.MAX_FILE_BYTES:,} bytes"),
  ]:
    said = [line for line in lines if line.startswith(f"warning: {path}:")]
    assert len(said) == 1 and why in said[0], (path, proc.stderr[-3000:])
  assert "4 of 6 files failed" in proc.stderr
  assert [r["path"] for r in _rows(out)] == [str(good), str(good2)]
  assert "good.png" in proc.stdout and "good2.png" in proc.stdout


def test_a_killed_run_keeps_the_rows_of_its_finished_batches(tmp_path, workdir, lsemil):
  src = _png(tmp_path / "src.png")
  files = []
  for i in range(400):
    files.append(tmp_path / f"img{i:03d}.png")
    os.link(src, files[-1])
  out = tmp_path / "P"
  proc = lsemil.popen(
    "predict", "--checkpoint", workdir, *files, "--out", out, "--batch-size", "2",
    "--threshold", "1", "--no-progress", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
  )  # fmt: skip
  table = out / "predictions.csv"
  try:
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
      if table.is_file() and table.read_text().count("\n") > 6:
        break
      time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  text = table.read_text()
  assert text.endswith("\n")
  rows = _rows(out)
  assert 6 <= len(rows) < len(files), len(rows)
  header = [*engine.csv_columns(CLASSES), "path", "classes_p>=1"]
  assert next(csv.reader(io.StringIO(text))) == header
  assert [r["path"] for r in rows] == [str(f) for f in files[: len(rows)]]
  for r in rows:
    assert all(0.0 <= float(r[c]) <= 1.0 for c in CLASSES)
