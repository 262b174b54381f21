"""Fine-tuning's first weights (lsemil.training.initialization): the class mapping, the copy of
the backbone and of the shared head columns, the refusals, and the frozen-backbone optimizer.

The CLI runs (fine-tuned vs from-scratch validation loss, a frozen backbone bit-identical after
training, a resumed fine-tuning run) are in tests/system/test_finetuning.py."""

from __future__ import annotations

import flax.traverse_util
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from lsemil.commands import train
from lsemil.core import fileio
from lsemil.core.configuration import load_config
from lsemil.core.errors import CheckpointError, ConfigError
from lsemil.data import nih
from lsemil.models import registry
from lsemil.runtime import bundle
from lsemil.training import initialization, trainer


def test_classes_by_name_then_synonym_new_and_left_out():
  m = initialization.map_classes(
    ["Atelectasis", "Pleural Effusion", "Fracture"], "chexpert",
    ["Effusion", "Atelectasis", "Hernia"], "nih",
  )  # fmt: skip
  assert m.columns == (1, 0, None)
  assert m.how == ("same name", "Pleural effusion", "new")
  assert m.copied == [
    ("Atelectasis", "Atelectasis", "same name"),
    ("Pleural Effusion", "Effusion", "Pleural effusion"),
  ]
  assert m.new == ["Fracture"] and m.unused == ["Hernia"]
  lines = "\n".join(m.lines())
  assert "2 of 3 classes copied" in lines and "Pleural Effusion <- Effusion (synonym" in lines
  assert "new classes (fresh rows): Fracture" in lines and "not used: Hernia" in lines
  # The same name wins over the table; no table across one dataset.
  same = initialization.map_classes(["Lung Opacity"], "rsna-pneumonia",
                                    ["Pneumonia", "Lung Opacity"], "chexpert")  # fmt: skip
  assert same.columns == (1,) and same.how == ("same name",)
  assert initialization.map_classes(["Effusion"], "nih", ["Pleural Effusion"], "nih").new == [
    "Effusion"
  ]


def test_a_class_two_source_classes_would_fill_is_not_copied_and_bad_names_are_refused():
  # RSNA's Lung Opacity is Pneumonia and Lung opacity in the table; a csv model has both.
  m = initialization.map_classes(["Lung Opacity"], "rsna-pneumonia",
                                 ["Pneumonia", "lung_opacity"], "csv")  # fmt: skip
  assert m.columns == (None,) and m.new == ["Lung Opacity"]
  assert "several (Pneumonia, lung_opacity)" in m.how[0]
  assert "Lung Opacity (not copied: the source has several" in "\n".join(m.lines())
  with pytest.raises(ConfigError, match="source model's data.classes.*'Mass'"):
    initialization.map_classes(["Mass"], "nih", ["Mass", "Mass"], "nih")
  with pytest.raises(ConfigError, match="run's data.classes"):
    initialization.map_classes(["", "Mass"], "nih", ["Mass"], "nih")


def _tree(k: int, seed: int, width: int = 4) -> dict:
  """A small model-shaped tree: backbone conv + BatchNorm, the head conv, LSE-LBA beta."""
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  return {
    "params": {
      "stem": {"kernel": r(3, 3, 1, width)},
      "stem_norm": {"scale": r(width), "bias": r(width)},
      "head": {"kernel": r(1, 1, width, k), "bias": r(k)},
      "pool": {"beta": r(k)},
    },
    "batch_stats": {"stem_norm": {"mean": r(width), "var": r(width)}},
  }


def test_backbone_copied_and_head_columns_of_shared_classes_only():
  mapping = initialization.map_classes(["A", "B", "New"], "nih", ["B", "Old", "A"], "nih")
  source, fresh = _tree(3, seed=0), _tree(3, seed=1)
  out, notes = initialization.transplant(source, fresh, mapping)
  assert notes == []
  for part in ("stem", "stem_norm"):
    for name, a in source["params"][part].items():
      np.testing.assert_array_equal(out["params"][part][name], a)
  np.testing.assert_array_equal(out["batch_stats"]["stem_norm"]["var"],
                                source["batch_stats"]["stem_norm"]["var"])  # fmt: skip
  for leaf in ("kernel", "bias"):
    got, src, new = (t["params"]["head"][leaf] for t in (out, source, fresh))
    np.testing.assert_array_equal(got[..., 0], src[..., 2])  # A <- A
    np.testing.assert_array_equal(got[..., 1], src[..., 0])  # B <- B
    np.testing.assert_array_equal(got[..., 2], new[..., 2])  # New keeps its fresh row
  beta = out["params"]["pool"]["beta"]
  np.testing.assert_array_equal(beta, [source["params"]["pool"]["beta"][i] for i in (2, 0)]
                                + [fresh["params"]["pool"]["beta"][2]])  # fmt: skip
  assert fresh["params"]["head"]["bias"][0] != out["params"]["head"]["bias"][0]  # not in place
  # A shared scalar beta (per_class_beta=False) is copied as it is; against per-class betas,
  # or where the run's pooling has none, it is not, with a note.
  source["params"]["pool"]["beta"] = np.float32(2.5)
  fresh["params"]["pool"]["beta"] = np.float32(0.0)
  assert initialization.transplant(source, fresh, mapping)[0]["params"]["pool"]["beta"] == 2.5
  fresh["params"]["pool"]["beta"] = np.zeros(3, np.float32)
  out, notes = initialization.transplant(source, fresh, mapping)
  assert notes == ["params/pool/beta is () in the source, (3,) here: not copied"]
  np.testing.assert_array_equal(out["params"]["pool"]["beta"], np.zeros(3))
  del fresh["params"]["pool"]
  out, notes = initialization.transplant(source, fresh, mapping)
  assert notes == ["params/pool/beta: only the source has it"] and "pool" not in out["params"]


def test_another_architecture_is_refused_naming_the_parameter_and_both_shapes():
  mapping = initialization.map_classes(["A"], "nih", ["A"], "nih")
  wide = _tree(1, 1)
  wide["params"]["stem"]["kernel"] = np.zeros((3, 3, 1, 8), np.float32)
  with pytest.raises(ConfigError, match=r"params/stem/kernel is \(3, 3, 1, 4\) in the source, "
                                        r"\(3, 3, 1, 8\) here"):  # fmt: skip
    initialization.transplant(_tree(1, 0), wide, mapping)
  wide["params"]["head"]["kernel"] = np.zeros((1, 1, 8, 1), np.float32)  # follows the stem
  with pytest.raises(ConfigError, match="params/stem/kernel is"):
    initialization.transplant(_tree(1, 0), wide, mapping)
  extra = _tree(1, 1)
  extra["params"]["dense1"] = {"kernel": np.zeros((3, 3, 4, 4), np.float32)}
  with pytest.raises(ConfigError, match="only this run's model has params/dense1/kernel"):
    initialization.transplant(_tree(1, 0), extra, mapping)
  with pytest.raises(ConfigError, match="only the source has batch_stats/stem_norm/mean"):
    initialization.transplant(_tree(1, 0), {"params": _tree(1, 1)["params"]}, mapping)
  with pytest.raises(ConfigError, match="2 class columns in the source.*name 1 and 1"):
    initialization.transplant(_tree(2, 0), _tree(1, 1), mapping)


@pytest.fixture(scope="module")
def smoke(random_variables):
  config = load_config("smoke")
  return config, random_variables(registry.from_config(config.model), seed=3)


def test_initialize_from_an_export_folder_logs_the_mapping_and_refuses_bad_sources(
  tmp_path, smoke, random_variables, capsys
):
  config, source = smoke
  bundle.write(tmp_path / "x", config, source, step=7, source="W/checkpoints/7", version="t")
  fresh = random_variables(registry.from_config(config.model), seed=4)
  out, mapping = initialization.initialize(tmp_path / "x", fresh, config)
  assert len(mapping.copied) == 14 and not mapping.new
  copied, want = bundle.flatten(out), bundle.flatten(source)
  assert copied.keys() == want.keys()
  for key, a in want.items():
    np.testing.assert_array_equal(copied[key], a)  # same classes: everything copied
  err = capsys.readouterr().err
  assert f"initialised from {tmp_path / 'x'} (step 7, source nih)" in err
  assert "head: 14 of 14 classes copied" in err and "new classes (fresh rows): none" in err
  # Non-finite weights and a missing source are refused, naming what is wrong.
  bad = {k: np.array(v) for k, v in bundle.flatten(source).items()}  # copies
  bad["params/stem/kernel"][0, 0, 0, 0] = np.nan
  bad = flax.traverse_util.unflatten_dict(bad, sep="/")
  bundle.write(tmp_path / "nan", config, bad, step=7, source="W", version="t")
  with pytest.raises(CheckpointError, match=r"init_from: .*non-finite weights: \['params'\]\['st"):
    initialization.initialize(tmp_path / "nan", fresh, config)
  with pytest.raises(CheckpointError, match="train.init_from: .*nowhere"):
    initialization.initialize(tmp_path / "nowhere", fresh, config)
  # Another model (wider stem) is refused through the same path.
  wide = load_config("smoke")
  wide.model.stem_features = 16
  first = r"params/down1/Conv_0/kernel is \(1, 1, 8, 8\) in the source, \(1, 1, 16, 8\) here"
  with pytest.raises(ConfigError, match="train.init_from=.*" + first):
    initialization.initialize(tmp_path / "x", random_variables(registry.from_config(wide.model)),
                              wide)  # fmt: skip


def test_initialize_from_a_checkpoint_step_of_other_classes(
  tmp_path, smoke, random_variables, write_checkpoint, capsys
):
  """A step folder of a 3-class csv run into an NIH run: its config's classes map by name."""
  config, fresh = smoke
  other = load_config("smoke")
  other.data.source, other.data.classes, other.model.num_classes = "csv", ("Mass", "X", "Edema"), 3
  source = random_variables(registry.from_config(other.model), seed=5)
  write_checkpoint(tmp_path / "w", other, source, 5)
  out, mapping = initialization.initialize(tmp_path / "w" / "checkpoints" / "5", fresh, config)
  assert [(t, s) for t, s, _ in mapping.copied] == [("Mass", "Mass"), ("Edema", "Edema")]
  assert len(mapping.new) == 12 and mapping.unused == ["X"]
  got, src, new = (t["params"]["head"]["kernel"] for t in (out, source, fresh))
  np.testing.assert_array_equal(got[..., nih.CLASSES.index("Mass")], src[..., 0])
  np.testing.assert_array_equal(got[..., nih.CLASSES.index("Edema")], src[..., 2])
  np.testing.assert_array_equal(got[..., 0], new[..., 0])  # Atelectasis: fresh
  np.testing.assert_array_equal(out["params"]["stem"]["kernel"], source["params"]["stem"]["kernel"])
  assert "checkpoints/5 (step 5, source csv)" in capsys.readouterr().err


def test_freeze_backbone_updates_the_head_only_and_is_a_resume_field():
  config = load_config("smoke")
  config.train.freeze = "backbone"
  tx = trainer.create_optimizer(config)
  params = _tree(2, 0)["params"]
  grads = {k: {n: jnp.ones_like(v) for n, v in p.items()} for k, p in params.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  for part, leaves in updates.items():
    for name, u in leaves.items():
      frozen = part not in initialization.HEAD_MODULES
      assert (np.abs(np.asarray(u)).max() == 0) == frozen, (part, name)
  assert initialization.labels(params)["pool"]["beta"] == "head"
  config.train.freeze = "all"
  with pytest.raises(ConfigError, match="train.freeze must be one of none, backbone"):
    trainer.validate_config(config)
  # A workdir saved before the field existed resumes as freeze=none, not as backbone.
  config.train.freeze = "none"
  saved = load_config("smoke").to_dict()
  del saved["train"]["freeze"]
  assert trainer.config_differences(saved, config) == []
  config.train.freeze = "backbone"
  assert trainer.config_differences(saved, config) == ["train.freeze: 'none' -> 'backbone'"]


def test_init_from_flag():
  argv = ["--config", "smoke", "--workdir", "/tmp/w"]
  fv = train.parse_flags([*argv, "--init-from", "runs/../x"])
  assert fv.config.train.init_from == fileio.resolve("x")
  same = train.parse_flags([*argv, "--init-from=x", "--config.train.init_from=./x"])
  assert same.config.train.init_from == fileio.resolve("x")
  with pytest.raises(flags.Error, match="--init-from y and --config.train.init_from=x disagree"):
    train.parse_flags([*argv, "--init-from=y", "--config.train.init_from=x"])
  assert train.parse_flags(argv).config.train.init_from == ""
