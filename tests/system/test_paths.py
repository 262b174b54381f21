"""Every path form through the CLI, as README shows them: relative, `~`, absolute; and a
resume with another config refused before anything in the workdir changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def here(tmp_path_factory, lsemil) -> Path:
  """A user's folder with `configs` beside them, as in a clone; a relative-path run in it."""
  cwd = tmp_path_factory.mktemp("user")
  (cwd / "configs").symlink_to(REPO / "configs")
  lsemil("train", "--config", "configs/smoke.py", "--workdir", "runs/r0_5", cwd=cwd, home=cwd)
  return cwd


def test_relative_workdir_trains_and_checkpoints_land_there(here):
  w = here / "runs" / "r0_5"
  assert (w / "checkpoints" / "6").is_dir() and (w / "result.json").is_file()
  result = json.loads((w / "result.json").read_text())
  assert result["workdir"] == str(w.resolve())  # recorded absolute
  assert not list(w.glob("checkpoints/*.orbax-checkpoint-tmp*"))


def test_relative_and_home_paths_in_evaluate_reproduce_predict(here, lsemil):
  lsemil("evaluate", "--workdir", "runs/r0_5", "--n-boot", "0", "--out", "results/eval.json",
         "--no-progress", cwd=here, home=here)  # fmt: skip
  assert (here / "results" / "eval.json").is_file()
  assert (here / "results" / "eval_predictions.csv").is_file()
  lsemil("evaluate", "--checkpoint", "~/runs/r0_5/checkpoints/6", "--n-boot", "0", "--out",
         "~/results/home.json", "--no-progress", cwd=REPO, home=here)  # fmt: skip
  assert (here / "results" / "home.json").is_file()
  lsemil("reproduce", "--run", "r0=5:runs/r0_5", "--n-boot", "0", "--figure-images", "1", "--out",
         "results/", "--no-progress", cwd=here, home=here)  # fmt: skip
  assert (here / "results" / "table3.md").is_file()
  image = sorted((here / "runs" / "r0_5" / "data" / "images").glob("*.png"))[0]
  rel = os.path.relpath(image, here)
  lsemil(
    "predict", "--checkpoint", "runs/r0_5", rel, "--out", "predictions", "--no-progress", cwd=here,
    home=here,
  )
  assert (here / "predictions" / "predictions.csv").is_file()


def test_resume_with_another_model_config_is_refused_before_any_write(here, lsemil):
  w = here / "runs" / "r0_5"
  from lsemil.training import workdir_lock

  def files():  # the lock file records each run that takes the lock: not the run's data
    return {
      p: p.stat().st_mtime_ns
      for p in w.rglob("*")
      if p.is_file() and p.name != workdir_lock.LOCK_FILE
    }

  before = files()
  proc = lsemil.run(
    "train",
    "--config",
    "configs/smoke.py",
    "--workdir",
    "runs/r0_5",
    "--config.model.r0=7",
    "--config.train.num_steps=9",
    cwd=here,
    home=here,
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "model.r0: 5.0 -> 7.0" in proc.stderr and "Traceback" not in proc.stderr
  assert files() == before  # config.json, checkpoints, metrics: untouched
