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


def one_error_line(proc: subprocess.CompletedProcess, *, alone: bool = True) -> str:
  """The error line (the last; with `alone`, the only line) of a command that failed with a
  UserError."""
  assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 or not alone, proc.stderr[-2000:]
  assert lines[-1].startswith("lsemil "), proc.stderr[-2000:]
  return lines[-1]


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


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory, synth_dir, random_variables, write_checkpoint) -> Path:
  """A workdir with one checkpoint of the smoke model (random weights, no training)."""
  from lsemil.core import configuration
  from lsemil.models import registry

  config = configuration.load_config("smoke")
  config.data.data_dir = str(synth_dir)
  workdir = tmp_path_factory.mktemp("smoke") / "w"
  write_checkpoint(workdir, config, random_variables(registry.from_config(config.model)), 7)
  return workdir


def test_empty_split_is_refused_before_any_result_is_written(tmp_path, synth_dir, smoke_workdir,
                                                             lsemil):  # fmt: skip
  d = _metadata_copy(synth_dir, tmp_path / "nih")
  shutil.copy2(synth_dir / "lsemil_dataset.json", d)
  (d / "images").symlink_to(synth_dir / "images")
  test = (d / "test_list.txt").read_text()
  with (d / "train_val_list.txt").open("a") as f:
    f.write("\n" + test)
  (d / "test_list.txt").write_text("")
  out = tmp_path / "out"
  proc = lsemil.run("evaluate", "--workdir", smoke_workdir, "--data-dir", d,
                    "--out", out / "e.json", "--no-progress")  # fmt: skip
  err = one_error_line(proc, alone=False)  # after the log line naming the checkpoint
  assert "the test split of" in err and str(d) in err and "empty" in err
  assert not out.exists() and not list(smoke_workdir.glob("evaluation*"))


@pytest.mark.parametrize("label", ["a|b", "a\nb", "tab\there", "x\x1b[31m"])
def test_report_breaking_run_label_is_refused_before_any_work(tmp_path, smoke_workdir, lsemil,
                                                              label):  # fmt: skip
  out = tmp_path / "R"
  proc = lsemil.run("reproduce", "--run", f"{label}:{smoke_workdir}", "--out", out)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert f"the label {label!r} holds" in proc.stderr and "any printable" in proc.stderr
  assert not out.exists() and not list(smoke_workdir.glob("evaluation*"))


def test_mathtext_run_label_is_drawn_as_written(tmp_path, smoke_workdir, lsemil):
  out, w = tmp_path / "R", tmp_path / "w"
  shutil.copytree(smoke_workdir, w)  # reproduce stores its evaluation in the workdir
  label = r"$\foo$"
  lsemil("reproduce", "--run", f"{label}:{w}", "--out", out, "--n-boot", 0,
         "--figure-images", 2, "--no-progress", "--force")  # fmt: skip
  assert f"AUC {label} (ours)" in (out / "table3.md").read_text()
  for png in ("figure3.png", "roc_curves.png"):
    assert (out / png).stat().st_size > 0
