"""User errors print one line naming the field or file, with the same exit status everywhere."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lsemil.commands import cli
from lsemil.core.errors import EXIT_USER_ERROR

REPO = Path(__file__).resolve().parents[2]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  return proc.stderr


def _train_error(lsemil, tmp_path, *overrides: str) -> str:
  """The one error line of `lsemil train` on the smoke config with these overrides."""
  return one_error_line(
    lsemil.run("train", "--config", "configs/smoke.py", "--workdir", tmp_path / "w", *overrides)
  )


def test_unknown_config_field_names_the_section_and_field(tmp_path, lsemil):
  err = _train_error(lsemil, tmp_path, "--config.train.nope=1")
  assert "--config.train.nope" in err and "train has no field 'nope'" in err


def test_val_fraction_zero_fails_early_naming_the_field(tmp_path, lsemil):
  err = _train_error(lsemil, tmp_path, "--config.data.val_fraction=0")
  assert "data.val_fraction" in err
  assert not (tmp_path / "w").exists()  # refused before anything was written


@pytest.mark.parametrize(
  "args",
  [
    ("stats", "--nih-dir", "/nonexistent/nih"),
    ("evaluate", "--workdir", "/nonexistent/run"),
    ("predict", "--checkpoint", "/nonexistent/run", "x.png"),
    ("prepare", "--nih-dir", "/nonexistent/nih", "--out", "/tmp/lsemil_never"),
  ],
)
def test_missing_inputs_exit_1_with_the_path(args, capsys):
  assert cli.main(list(args)) == EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert "/nonexistent/" in err and err.startswith(f"lsemil {args[0]}: ")
  assert len(err.strip().splitlines()) == 1


def test_a_bug_is_not_swallowed(monkeypatch):
  """Only UserErrors become one line: any other exception keeps its traceback."""
  from lsemil.commands import stats

  def boom(argv):
    raise ValueError("a bug")

  monkeypatch.setattr(stats, "main", boom)
  with pytest.raises(ValueError, match="a bug"):
    cli.main(["stats", "--nih-dir", "x"])


@pytest.mark.parametrize("closes", [True, False], ids=["bars-context", "bar-left-open"])
def test_an_error_in_a_barred_loop_prints_on_its_own_line(monkeypatch, capsys, closes):
  """A UserError raised half way through a progress bar: the bar's line ends first, so the
  error is a line of its own (whether or not the command closed its bar)."""
  from lsemil.commands import progress, stats
  from lsemil.core.errors import DataError

  def loop(bar):
    for i in range(4):
      bar("read", i, 8)
    raise DataError("labels.csv, line 5: no such class 'Nope'")

  def failing(argv):
    if closes:
      with progress.bars() as bar:
        loop(bar)
    loop(progress.Bars())

  monkeypatch.setattr(stats, "main", failing)
  assert cli.main(["stats"]) == EXIT_USER_ERROR
  lines = capsys.readouterr().err.split("\n")  # not splitlines: the bar redraws with \r
  assert lines[-2:] == ["lsemil stats: labels.csv, line 5: no such class 'Nope'", ""], lines
  assert "read:" in lines[-3]
