"""Inputs that used to pass silently and spoil the results are refused up front, through the
CLI, with one line naming the file, line, split, field or label (Reliability round 3)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
  ("config", "override", "field"),
  [
    ("smoke", "--config.model.r0=nan", "model.r0"),
    ("smoke", "--config.model.r0=inf", "model.r0"),
    ("smoke", "--config.model.beta_init=nan", "model.beta_init"),
    ("smoke", "--config.train.learning_rate=-inf", "train.learning_rate"),
    ("smoke", "--config.data.val_fraction=nan", "data.val_fraction"),
    ("smoke:r0=nan", None, "model.r0"),
  ],
)
def test_non_finite_config_float_is_refused_at_once(tmp_path, lsemil, config, override, field):
  args = ("train", "--config", config, "--workdir", tmp_path / "w", *filter(None, [override]))
  err = one_error_line(lsemil.run(*args, timeout=60))
  assert f"config {field}=" in err and "not finite" in err
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_info_refuses_a_non_finite_config_float(lsemil):
  assert "config model.r0=inf is not finite" in one_error_line(
    lsemil.run("info", "--config", "smoke:r0=inf")
  )


@pytest.mark.parametrize("command", ["train", "info"])
def test_config_syntax_error_is_one_line_with_file_and_line(tmp_path, lsemil, command):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=None):\n  return 1\n\nx = (\n")
  args = ("--workdir", tmp_path / "w") if command == "train" else ()
  err = one_error_line(lsemil.run(command, "--config", bad, *args))
  assert f"{bad}:4: syntax error in config file" in err


@pytest.mark.parametrize("command", ["train", "info"])
def test_bad_config_argument_is_one_line(tmp_path, lsemil, command):
  args = ("--workdir", tmp_path / "w") if command == "train" else ()
  err = one_error_line(lsemil.run(command, "--config", "configs/smoke.py:bogusarg", *args))
  assert "config argument r0='bogusarg' is not float" in err
