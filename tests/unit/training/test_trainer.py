"""The train step, validation hooks and the `lsemil train` command line (paper Sec 4.2).

End-to-end runs (CLI smoke run, exact resume, NaN stop) are in tests/system/test_resume.py
and the 1-vs-8-device equivalence in test_sharding.py; these tests stay in-process and small.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath

from lsemil.commands import cli, train
from lsemil.core.configuration import load_config
from lsemil.core.errors import ConfigError, DataError, WorkdirBusyError
from lsemil.data import imageio, nih, pipeline
from lsemil.inference import engine
from lsemil.models import mil
from lsemil.runtime import sharding
from lsemil.training import trainer, workdir_lock


@pytest.fixture
def fast_compiles():
  """Cheaper XLA CPU compiles for this test only (flax's example tests do the same)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def test_train_step_then_validation_through_the_inference_path(fast_compiles, synth_dir):
  config = load_config("smoke")
  model = mil.from_config(config.model)
  tx = trainer.create_optimizer(config)
  mesh = sharding.create_mesh(jax.devices()[:1])
  _, state_sh = trainer.state_sharding_for(config, model, tx, mesh)
  state = trainer.init_state(config, model, tx, mesh, state_sh)
  stats0 = jax.device_get(state.batch_stats)
  rng = np.random.default_rng(0)
  s = config.model.input_size
  batch = {  # uint8 images, as the input pipeline yields them (the model scales to [0, 1])
    "image": rng.integers(0, 256, size=(8, s, s, 1), dtype=np.uint8),
    "labels": (rng.uniform(size=(8, 14)) < 0.3).astype(np.float32),
  }
  step_fn = trainer.make_train_step(model, tx, mesh, state_sh)
  losses = []
  with jax.set_mesh(mesh):
    gb = sharding.global_batch(batch, sharding.batch_sharding(mesh))
    for _ in range(4):
      state, metrics = step_fn(state, gb)
      losses.append(float(metrics["loss"]))
  assert int(state.step) == 4
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # Adam fits a fixed batch
  assert set(metrics) == {"loss", "grad_norm", "param_norm", "r"}
  beta = np.asarray(state.params["pool"]["beta"])
  assert float(metrics["r"]) == pytest.approx(np.mean(config.model.r0 + np.exp(beta)), rel=1e-6)
  moved = jax.tree.map(
    lambda a, b: not np.allclose(a, b), stats0, jax.device_get(state.batch_stats)
  )
  assert any(jax.tree.leaves(moved))  # BatchNorm running statistics were updated
  # Float32 params and Adam moments (the model's compute dtype only affects activations).
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} <= {
    jnp.dtype("float32"),
    jnp.dtype("int32"),
  }

  # Validation (Sec 4.2) through the one inference path, on the training state's arrays: an
  # eval batch size that does not divide the split, so the last batch is padded and masked.
  predictor = engine.Predictor(model, trainer.state_variables(state), mesh)
  rows = pipeline.split_rows(config, synth_dir, "valid")
  config.train.eval_batch_size = 16 if len(rows) % 16 else 12
  assert len(rows) % config.train.eval_batch_size
  val, preds = trainer.validate(predictor, config, str(synth_dir))
  np.testing.assert_array_equal(preds.rows, np.sort(rows))  # every image once, index order
  assert val["val_examples"] == len(rows) == len(preds.probs)
  probs = preds.probs.astype(np.float64)
  assert probs.shape == (len(rows), 14) and np.all((probs >= 0) & (probs <= 1))
  index = nih.open_index(synth_dir, val_fraction=0.25, split_seed=0)
  np.testing.assert_array_equal(preds.labels, index.labels[preds.rows])
  p = np.clip(probs, 1e-7, 1 - 1e-7)
  y = preds.labels.astype(np.float64)
  bce = -np.mean(np.sum(y * np.log(p) + (1 - y) * np.log1p(-p), axis=1))
  assert val["val_loss"] == pytest.approx(bce, rel=1e-4)
  aucs = [a for a in val["val_per_class_auc"] if a is not None]
  assert len(val["val_per_class_auc"]) == 14 and len(aucs) == 14 - len(val["val_missing_classes"])
  assert val["val_mean_auc"] == pytest.approx(np.mean(aucs))

  # The same image read from its file through `model_input` (the contract every command uses)
  # gives the validation's probabilities; saliency maps (and the per-level maps) on request.
  first = int(preds.rows[0])
  x = engine.model_input(imageio.read_gray(index.image_paths[first]), s)
  host = engine.Predictor(model, jax.device_get(trainer.state_variables(state)), mesh)
  out = host.predict_images(x[None], 2, saliency=True, levels=True)
  np.testing.assert_allclose(out["probs"][0], preds.probs[0], rtol=1e-5, atol=1e-6)
  n = config.model.saliency_size
  assert out["saliency"].shape == (1, n, n, 14)
  assert out["saliency_levels"][-1].shape == (1, n, n, 14)
  with pytest.raises(TypeError, match="uint8"):
    host(x[None].astype(np.float32))


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("model.saliency_size", 12, "saliency_size"),
    ("train.learning_rate", float("nan"), "learning_rate"),
    ("train.batch_size", 0, "batch_size"),
    ("train.num_steps", -1, "num_steps"),
    ("data.val_fraction", 0.0, "val_fraction"),
    ("data.val_fraction", 1.0, "val_fraction"),
    ("data.source", "padchest", r"data\.source='padchest': expected one of nih, chexpert"),
    ("data.uncertain", "maybe", r"data\.uncertain must be one of ignore, zeros, ones"),
  ],
)
def test_config_errors_raise_before_anything_runs(tmp_path, field, value, match):
  config = load_config("smoke")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=match):
    trainer.train_and_evaluate(config, tmp_path / "w", data_dir=tmp_path)
  assert not (tmp_path / "w").exists()  # nothing written, nothing compiled


def test_missing_dataset_is_a_clear_error_unless_synthesized(tmp_path):
  config = load_config("demo")
  assert config.data.synth_patients == 0 and load_config("smoke").data.synth_patients == 40
  with pytest.raises(DataError, match="--data-dir"):
    trainer.train_and_evaluate(config, tmp_path / "w")
  with pytest.raises(DataError, match="local disk"):
    trainer.resolve_data_dir(config, tmp_path / "w", "gs://bucket/data")


def test_resume_with_another_config_is_refused_naming_the_fields(tmp_path):
  saved = load_config("smoke")
  w = tmp_path / "w"
  (w / "checkpoints" / "3").mkdir(parents=True)
  (w / "config.json").write_text(saved.to_json_best_effort())
  config = load_config("smoke:r0=10")
  config.seed = 1
  config.train.num_steps = 100  # free to change on resume
  diff = trainer.config_differences(json.loads(saved.to_json_best_effort()), config)
  assert diff == ["model.r0: 5.0 -> 10.0", "seed: 0 -> 1"]
  with pytest.raises(ConfigError, match=r"model\.r0: 5\.0 -> 10\.0; seed: 0 -> 1"):
    trainer.train_and_evaluate(config, w, data_dir=tmp_path)
  assert sorted(p.name for p in w.iterdir() if not p.name.startswith(".")) == [
    "checkpoints",
    "config.json",
  ]
  assert json.loads((w / "config.json").read_text()) == json.loads(saved.to_json_best_effort())
  saved.train.num_steps = 100  # steps, cadences and the like may change
  trainer.check_resume_config(epath.Path(w), saved)


def test_second_train_on_a_held_workdir_is_refused(tmp_path):
  w = tmp_path / "w"
  with workdir_lock.hold(str(w)):
    with pytest.raises(WorkdirBusyError, match=str(w)):
      trainer.train_and_evaluate(load_config("smoke"), w, data_dir=tmp_path)
  assert not (w / "config.json").exists() and not (w / "checkpoints").exists()


def test_flags_overrides_and_sibling_config_imports():
  fv = train.parse_flags(
    [
      "--config",
      "configs/smoke.py:r0=10",
      "--workdir",
      "/tmp/w",
      "--data-dir",
      "/tmp/d",
      "--config.train.batch_size=16",
      "--config.model.dtype=bfloat16",
    ]
  )
  assert fv.config.model.r0 == 10.0  # paper.py's argument, through demo.py and smoke.py
  assert fv.config.train.batch_size == 16 and fv.config.model.dtype == "bfloat16"
  assert fv.config.model.input_size == 64  # smoke's own value
  assert fv.workdir == "/tmp/w" and fv.data_dir == "/tmp/d"
  paper = train.parse_flags(["--config=configs/paper.py:r0=0", "--workdir=/tmp/w"])
  assert paper.config.model.r0 == 0.0 and paper.config.train.init_from == ""


def test_cli_help_and_usage_errors(capsys):
  assert cli.main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  assert "lsemil train --config" in out and "--workdir" in out and "--config.train" in out

  def error(argv, *words):
    """Bad flags are a ConfigError: exit 1, 'lsemil train: <message>' naming what is wrong."""
    assert cli.main(["train", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lsemil train: "), err
    for w in words:
      assert w in err, err
    with pytest.raises(ConfigError):  # the command module raises, the CLI prints
      train.main(argv)

  error(["--config", "configs/smoke.py"], "--workdir")
  error(["--config", "configs/smoke.py", "--workdir", "w", "--config.x.y=1"], "'x'", "model")
  error(["--config", "configs/nothere.py", "--workdir", "w"], "nothere.py")


def test_early_stopping_counts_evaluations_without_improvement():
  meta = {"best_step": None, "best_val_mean_auc": None, "evals_since_best": 0}
  history = [(1, None), (2, 0.6), (3, 0.7), (4, 0.65), (5, 0.7), (6, 0.69)]
  stopped = []
  for step, auc in history:
    meta.update(trainer.early_stopping_update(meta, step, auc, patience=3))
    stopped.append(meta["stopped_early"])
  assert meta["best_step"] == 3 and meta["best_val_mean_auc"] == 0.7  # ties do not improve
  assert stopped == [False, False, False, False, False, True]
  last = trainer.early_stopping_update(meta, 7, 0.1, patience=3, last_step=True)
  assert last["stopped_early"] is False  # the run ends anyway
  assert not trainer.early_stopping_update(meta, 7, 0.1, patience=0)["stopped_early"]


def test_classes_and_num_classes_follow_the_source(tmp_path, synth_dir):
  from lsemil.data import findings

  root = tmp_path / "csv"
  (root / "images").mkdir(parents=True)
  for k in range(3):
    imageio.write_png_atomic(root / "images" / f"{k}.png", imageio.encode_png(
      np.zeros((32, 32), np.uint8)))
  (root / "labels.csv").write_text("path,patient,split,A,B,C\nimages/0.png,p0,train,1,0,\n"
                                   "images/1.png,p1,valid,0,-1,1\nimages/2.png,p2,test,0,0,0\n")
  config = load_config("smoke")
  config.data.data_dir, config.data.source = str(root), "csv"
  assert trainer.resolve_classes(config) == ("A", "B", "C")
  assert (config.model.num_classes, findings.of_config(config)) == (3, ("A", "B", "C"))
  saved = json.loads(config.to_json_best_effort())
  assert findings.of_config(ml_collections.ConfigDict(saved)) == ("A", "B", "C")  # as restored
  assert trainer.resolve_classes(config) == ("A", "B", "C")  # a resumed run's own classes
  config.model.num_classes = 5
  with pytest.raises(ConfigError, match=r"model\.num_classes=5, but the source csv .* has 3"):
    trainer.resolve_classes(config)
  config.model.num_classes, config.data.classes = 3, ("A", "C", "B")
  with pytest.raises(ConfigError, match=r"data\.classes \['A', 'C', 'B'\] differ"):
    trainer.resolve_classes(config)
  nih_config = load_config("smoke")
  nih_config.data.data_dir = str(synth_dir)
  assert trainer.resolve_classes(nih_config) == nih.CLASSES
  nih_config.model.num_classes = 3
  with pytest.raises(ConfigError, match="model.num_classes=3"):
    trainer.resolve_classes(nih_config)
  # A workdir trained on another source's classes is not resumed; one from before the class
  # list was data (no data.source, data.classes) is, as NIH.
  old = json.loads(load_config("smoke").to_json_best_effort())
  del old["data"]["source"], old["data"]["classes"]
  nih_config.model.num_classes = 14
  assert trainer.config_differences(old, nih_config) == []
  assert trainer.config_differences(saved, nih_config)[:2] == [
    "data.classes: ['A', 'B', 'C'] -> " + repr(list(nih.CLASSES)), "data.source: 'csv' -> 'nih'"]
