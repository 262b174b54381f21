"""Inputs that used to pass silently and spoil the results are refused up front, through the
CLI, with one line naming the file, line, split, field or label (Reliability round 3)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lsemil.core.errors import EXIT_USER_ERROR

METADATA = (
  "Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt"
)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
  return proc.stderr


def _metadata_copy(synth_dir: Path, out: Path) -> Path:
  out.mkdir()
  for name in METADATA:
    shutil.copy2(synth_dir / name, out / name)
  return out


def test_duplicate_box_row_names_both_lines(tmp_path, synth_dir, lsemil):
  d = _metadata_copy(synth_dir, tmp_path / "nih")
  lines = (d / "BBox_List_2017.csv").read_text().splitlines()
  (d / "BBox_List_2017.csv").write_text("\n".join([*lines, lines[2]]) + "\n")
  err = one_error_line(lsemil.run("stats", "--nih-dir", d))
  assert f"BBox_List_2017.csv:{len(lines) + 1}: duplicate box" in err and "line 3" in err
