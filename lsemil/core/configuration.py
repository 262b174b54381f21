"""Loading configs: `path/to/config.py[:arg]` files with a `get_config(arg)` function.

The same files work with absl's `config_flags` (used by `lsemil train`); this loader
serves the commands that take a config without absl flags, the tests, and configs that
build on another (`configs/demo.py` starts from `load_config("paper", arg)`).
Configs are plain data: every default lives in the config files, none in the code.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import pathlib

import ml_collections

from lsemil.core.errors import ConfigError

CONFIG_PACKAGE = "lsemil.configs"  # the repo's configs/, installed as this package


def config_path(name: str) -> pathlib.Path:
  """'paper' -> the installed lsemil/configs/paper.py; a file path is returned as is."""
  path = pathlib.Path(name)
  if path.suffix == ".py" or path.exists():
    return path
  return pathlib.Path(str(importlib.resources.files(CONFIG_PACKAGE) / f"{name}.py"))


def load_config(spec: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Loads 'configs/paper.py:r0=5' (or 'paper:r0=5', or ('paper', 'r0=5')) into a ConfigDict."""
  name, _, spec_arg = spec.partition(":")
  arg = arg if arg is not None else (spec_arg or None)
  path = config_path(name)
  if not path.is_file():
    raise ConfigError(f"config file {path} not found (from {spec!r})")
  module_name = f"_lsemil_config_{path.stem}"
  loader_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(loader_spec)
  loader_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config(arg) function")
  return module.get_config(arg or None)
