"""lsemil.core.configuration: the config argument parser (big_vision's parse_arg) and names."""

from __future__ import annotations

import pytest

from lsemil.core import configuration
from lsemil.core.errors import ConfigError

SPEC = {"r0": 5.0, "N": 64, "seed": 0, "quick": False}


def test_parse_arg_types_from_the_defaults():
  got = configuration.parse_arg(" r0=10 , N=16,quick=TRUE", **SPEC)
  assert got.to_dict() == {"r0": 10.0, "N": 16, "seed": 0, "quick": True}
  assert configuration.parse_arg(None, **SPEC).to_dict() == SPEC
  assert configuration.parse_arg("quick", **SPEC).quick is True  # a bare bool name: true
  assert configuration.parse_arg("7", **SPEC).r0 == 7.0  # a bare value: the first argument


@pytest.mark.parametrize(
  "arg, match",
  [
    ("N=x", r"config argument N='x' is not int"),
    ("quick=maybe", r"quick='maybe' is not bool"),
    ("r0=1,N", r"config argument 'N' is not of the form key=value"),
    ("r0=1,bogus", r"'bogus' is not of the form key=value"),
    ("bogus=1,x=2", r"unknown config arguments \['bogus', 'x'\]; known: r0, N, seed, quick"),
  ],
)
def test_parse_arg_errors_name_the_item(arg, match):
  with pytest.raises(ConfigError, match=match):
    configuration.parse_arg(arg, **SPEC)


def test_split_arg_passes_the_rest_on():
  own, rest = configuration.split_arg("r0=3,size=demo,seed=1", size="paper")
  assert own.size == "demo" and rest == "r0=3,seed=1"
  assert configuration.split_arg(None, size="paper")[1] is None
  assert configuration.split_arg("3", size="paper")[1] == "3"  # the other config's bare value
  assert (
    configuration.load_config("demo:3").model.r0 == configuration.load_config("paper:3").model.r0
  )


def test_config_names_and_paths():
  assert configuration.available_configs() == ("baseline_gap", "demo", "paper", "smoke")
  assert configuration.config_path("paper").name == "paper.py"
  assert configuration.config_path("paper").is_file()
  assert str(configuration.config_path("configs/nothere.py")) == "configs/nothere.py"
  with pytest.raises(ConfigError, match="no config named 'papr'; available: baseline_gap, demo"):
    configuration.load_config("papr:r0=5")
  a, b = (
    configuration.load_config("paper:r0=0,N=16"),
    configuration.load_config("paper", "r0=0,N=16"),
  )
  assert a.to_dict() == b.to_dict() and (a.model.r0, a.model.saliency_size) == (0.0, 16)


def test_check_finite_walks_every_float_field():
  config = configuration.load_config("smoke")
  configuration.check_finite(config)  # the shipped configs are finite
  for field, value in [("train.learning_rate", float("inf")), ("data.val_fraction", float("nan"))]:
    c = config.copy_and_resolve_references()
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ConfigError, match=rf"config {field}=(inf|nan) is not finite"):
      configuration.check_finite(c)
  c = config.copy_and_resolve_references()
  c.model.widths = (8.0, float("-inf"))  # a float inside a tuple
  with pytest.raises(ConfigError, match=r"config model.widths=\(8.0, -inf\) is not finite"):
    configuration.check_finite(c)
