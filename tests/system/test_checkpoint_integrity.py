"""Damaged weights and foreign checkpoints, through the CLI on a real smoke run.

- a weight rewritten as NaN: `predict` and `evaluate` exit 1 with one line naming the step
  and the parameter (before: predict exited 0 with NaN probabilities and an overlay per class);
- a weight changed but finite: the step's checksums name it;
- resuming with another model is refused by the step's own config, whatever config.json
  says (deleted, edited to match, or a step folder copied from another model's run).

The damage is made by reading a step's model item with orbax, changing one value and writing
the item again in place (the same format `lsemil train` writes), without updating the step's
checksums: what a bit flip in the data file does, without depending on where tensorstore puts
the bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

STEPS = 3


def _train_args(workdir, data_dir, *extra):
  return ["train", "--config", "configs/smoke.py", "--workdir", workdir, "--data-dir", data_dir,
          *extra]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, synth_dir, jax_cache, lsemil) -> Path:
  w = tmp_path_factory.mktemp("integrity") / "run"
  lsemil(*_train_args(w, synth_dir, f"--config.train.num_steps={STEPS}"), cache=jax_cache)
  return w


@pytest.fixture
def run(smoke_run, tmp_path) -> Path:
  w = tmp_path / "run"
  shutil.copytree(smoke_run, w)
  return w


def _rewrite_weight(step_dir: Path, change) -> str:
  """Rewrites the step's model item with `change` applied to the first value of its first
  kernel; returns that parameter's path as the checksums name it."""
  import jax
  import orbax.checkpoint as ocp

  tree = jax.tree.map(np.array, ocp.PyTreeCheckpointer().restore(step_dir / "model"))
  path, leaf = next(
    (jax.tree_util.keystr(k), v) for k, v in jax.tree.leaves_with_path(tree)
    if "kernel" in jax.tree_util.keystr(k)
  )
  leaf.reshape(-1)[0] = change(leaf.reshape(-1)[0])
  tmp = step_dir.parent / "rewritten"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp, tree)
    ckptr.wait_until_finished()
  shutil.rmtree(step_dir / "model")
  tmp.rename(step_dir / "model")
  return path


def _steps(w: Path) -> list[Path]:
  return sorted((p for p in (w / "checkpoints").iterdir() if p.name.isdigit()),
                key=lambda p: int(p.name))


@pytest.mark.parametrize("kind", ["nan", "finite"])
def test_damaged_weight_is_refused_naming_step_and_parameter(
  run, kind, synth_dir, jax_cache, lsemil, tmp_path
):
  change = (lambda x: np.nan) if kind == "nan" else (lambda x: x + np.float32(0.5))
  named = {s.name: _rewrite_weight(s, change) for s in _steps(run)}  # every step: no fallback
  step = _steps(run)[-1]
  image = sorted((Path(synth_dir) / "images").glob("*.png"))[0]
  out = tmp_path / "pred"
  proc = lsemil.run("predict", "--checkpoint", run, image, "--out", out, cache=jax_cache)
  line = lsemil.one_error(proc, "predict")
  assert f"step {step.name}" in line and named[step.name] in line, line
  assert ("non-finite" if kind == "nan" else "checksum") in line, line
  assert not list(out.glob("*.png"))
  proc = lsemil.run("evaluate", "--checkpoint", step, "--n-boot", "10", cache=jax_cache)
  line = lsemil.one_error(proc, "evaluate")
  assert f"step {step.name}" in line and named[step.name] in line, line


def test_checkpoint_without_checksums_still_loads(run):
  from lsemil.runtime import checkpointing, integrity

  for s in _steps(run):
    shutil.rmtree(s / integrity.ITEM)
  _, _, variables, step, _ = checkpointing.load_inference(run, which="latest")
  assert step == int(_steps(run)[-1].name) and variables["params"]


# --------------------------------------------------------------------------- resume check


def _files(w: Path) -> dict:
  return {p: p.stat().st_mtime_ns for p in w.rglob("*") if p.is_file() and "lock" not in p.name}


def _resume(lsemil, w, synth_dir, jax_cache, *extra):
  before = _files(w)
  proc = lsemil.run(*_train_args(w, synth_dir, f"--config.train.num_steps={STEPS + 3}", *extra),
                    cache=jax_cache)
  line = lsemil.one_error(proc, "train")
  assert _files(w) == before  # refused before anything is written
  return line


def test_resume_without_config_json_checks_the_steps_own_config(run, synth_dir, jax_cache, lsemil):
  (run / "config.json").unlink()
  line = _resume(lsemil, run, synth_dir, jax_cache, "--config.model.stem_features=16")
  assert "model.stem_features: 8 -> 16" in line and f"step {_steps(run)[-1].name}" in line, line


def test_resume_with_config_json_edited_to_match_is_still_refused(
  run, synth_dir, jax_cache, lsemil
):
  saved = json.loads((run / "config.json").read_text())
  saved["model"]["stem_features"] = 16
  (run / "config.json").write_text(json.dumps(saved))
  line = _resume(lsemil, run, synth_dir, jax_cache, "--config.model.stem_features=16")
  assert "model.stem_features: 8 -> 16" in line, line


def test_resume_with_a_step_copied_from_another_model_is_refused(
  run, synth_dir, jax_cache, lsemil, tmp_path, write_checkpoint, random_variables
):
  from lsemil.core.configuration import load_config
  from lsemil.models import registry

  config = load_config("smoke")
  config.model.stem_features = 16
  other = tmp_path / "other"
  write_checkpoint(other, config, random_variables(registry.from_config(config.model)), 100)
  shutil.copytree(other / "checkpoints" / "100", run / "checkpoints" / "100")
  line = _resume(lsemil, run, synth_dir, jax_cache)
  assert "step 100" in line and "model.stem_features: 16 -> 8" in line, line
