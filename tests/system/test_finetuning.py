"""Fine-tuning through the CLI (`lsemil train --init-from`, lsemil.training.initialization): the
source is a smoke model trained 6 steps on the shared synthetic NIH dataset. Fine-tuned from it
on the same data, the first validation loss is below a from-scratch run's with the same seed.
Fine-tuned on a CheXpert-layout folder (U-Ignore) with `train.freeze=backbone`, the printed
mapping names the copied, new and unused classes, every backbone variable (BatchNorm
statistics included) is bit-identical to the source's after training, the copied head columns
start from their NIH classes, and a resumed run continues from its own checkpoint."""

from __future__ import annotations

import json

import flax.traverse_util
import numpy as np
import pytest

from lsemil.data import chexpert, layouts, nih
from lsemil.runtime import checkpointing
from lsemil.training import initialization

ONE_STEP = ("--config.train.num_steps=1", "--config.train.eval_every_steps=1")


def _train(lsemil, workdir, data_dir, *args):
  """`lsemil train` of the smoke config; its output."""
  proc = lsemil("train", "--config", "configs/smoke.py", "--workdir", workdir, "--data-dir",
                data_dir, *args)  # fmt: skip
  return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def source(tmp_path_factory, synth_dir, lsemil):
  """W1: the smoke config trained 6 steps from scratch, evaluated after each (so its first
  evaluation is a from-scratch run's first-step validation loss)."""
  w1 = tmp_path_factory.mktemp("finetune") / "w1"
  out = _train(lsemil, w1, synth_dir, "--config.train.eval_every_steps=1")
  assert "training from scratch" in out
  return w1


def _first_val_loss(workdir) -> float:
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return next(r["val_loss"] for r in records if r["kind"] == "eval" and r["step"] == 1)


def test_finetuned_run_starts_below_a_from_scratch_run(tmp_path, lsemil, synth_dir, source):
  out = _train(lsemil, tmp_path / "tuned", synth_dir, "--init-from", source, *ONE_STEP)
  best = json.loads((source / "result.json").read_text())["best_step"]
  assert f"initialised from {source / 'checkpoints' / str(best)} (step {best}" in out
  assert "head: 14 of 14 classes copied" in out and "new classes (fresh rows): none" in out
  # The source's own first step is the from-scratch run: same config, seed and data.
  tuned_loss, scratch_loss = _first_val_loss(tmp_path / "tuned"), _first_val_loss(source)
  assert tuned_loss < scratch_loss, (tuned_loss, scratch_loss)


def _flat(workdir, which: str) -> dict[tuple, np.ndarray]:
  _, _, variables, _, _ = checkpointing.load_inference(workdir, which=which)
  return flax.traverse_util.flatten_dict(variables)


def test_nih_model_fine_tuned_on_chexpert_with_a_frozen_backbone_then_resumed(
  tmp_path, lsemil, source
):
  """Across sources (CheXpert layout, U-Ignore): the mapping names the classes copied (by name
  and through the synonym table), the new ones and NIH's left out; the frozen backbone is
  bit-identical to the source's after two steps, the second one after a resume."""
  cx = tmp_path / "chexpert"
  layouts.write("chexpert", cx, patients=24, size=128)
  w = tmp_path / "frozen"
  args = ("--source", "chexpert", "--config.data.uncertain=ignore", "--init-from", source,
          "--config.train.freeze=backbone")  # fmt: skip
  first = _train(lsemil, w, cx, *args, *ONE_STEP)
  assert "head: 7 of 14 classes copied" in first and "Pleural Effusion <- Effusion (syn" in first
  assert "  Cardiomegaly <- Cardiomegaly\n" in first
  assert "new classes (fresh rows): No Finding, Enlarged Cardiomediastinum, Lung Opacity, " in first
  assert "source classes not used: Infiltration, Mass, Nodule, Emphysema, Fibrosis, " in first
  # Preempted after step 1 and run again with the same command (2 steps now): it continues.
  again = _train(lsemil, w, cx, *args, "--config.train.num_steps=2",
                 "--config.train.eval_every_steps=1")  # fmt: skip
  assert f"resuming from {w / 'checkpoints' / '1'} (step 1); train.init_from=" in again
  assert "initialised from" not in again
  tuned, start = _flat(w, "latest"), _flat(source, "best")
  assert tuned.keys() == start.keys()
  heads = [k for k in tuned if initialization.is_head(k)]
  assert {k[1] for k in heads} == {"head", "pool"}
  for key, value in tuned.items():
    if key not in heads:
      np.testing.assert_array_equal(value, start[key], err_msg="/".join(key))
  # Each copied column starts as its NIH class's (not as the column of the same index, another
  # class's): two Adam steps of lr 1e-3 move a weight by at most about 2e-3.
  cx_classes, nih_classes = chexpert.LABELS, nih.CLASSES
  for leaf in ("kernel", "bias"):
    got, was = tuned[("params", "head", leaf)], start[("params", "head", leaf)]
    for name, old in (("Cardiomegaly", "Cardiomegaly"), ("Pleural Effusion", "Effusion")):
      col, old_col = got[..., cx_classes.index(name)], was[..., nih_classes.index(old)]
      np.testing.assert_allclose(col, old_col, rtol=0, atol=2.5e-3, err_msg=name)
