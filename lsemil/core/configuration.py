"""Loading configs: `path/to/config.py[:arg]` files with a `get_config(arg)` function.

The same files work with absl's `config_flags` (used by `lsemil train`); this loader
serves the commands that take a config without absl flags, the tests, and configs that
build on another (`configs/demo.py` starts from `load_config("paper", ...)`). A config is
named by its file path or, for the configs that ship with the package (`lsemil.configs`, the
repo's configs/), by its name: `paper:r0=5` is `configs/paper.py:r0=5`. `parse_arg` reads
the `arg` string. Configs are plain data: every default lives in the config files, none in
the code.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
import pathlib
from typing import Any

import ml_collections

from lsemil.core.errors import ConfigError

CONFIG_PACKAGE = "lsemil.configs"  # the repo's configs/, installed as this package


def available_configs() -> tuple[str, ...]:
  """The names of the installed configs ('baseline_gap', 'demo', 'paper', 'smoke')."""
  files = importlib.resources.files(CONFIG_PACKAGE).iterdir()
  return tuple(sorted(f.name[:-3] for f in files if f.name.endswith(".py") and f.name[0] != "_"))


def config_path(name: str) -> pathlib.Path:
  """'paper' -> the installed lsemil/configs/paper.py; a file path is returned as is.

  A name is a word without '/' or '.py'; an unknown one raises ConfigError listing the
  available names.
  """
  path = pathlib.Path(name)
  if path.suffix == ".py" or path.is_file() or len(path.parts) != 1:
    return path
  if name not in available_configs():
    raise ConfigError(
      f"no config named {name!r}; available: {', '.join(available_configs())} "
      "(or a file path such as configs/paper.py)"
    )
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
  try:
    loader_spec.loader.exec_module(module)
  except SyntaxError as e:  # IndentationError too; the traceback says no more than this
    where = f"{e.filename or path}:{e.lineno}" if e.lineno else str(path)
    raise ConfigError(f"{where}: syntax error in config file: {e.msg}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config(arg) function")
  return module.get_config(arg or None)


def check_finite(config: Any, prefix: str = "") -> None:
  """ConfigError naming the first float field (at any depth, tuples too) that is nan or inf:
  `nan < 0` is False, so range checks alone let it through to fail after compiling."""
  items = config.items() if hasattr(config, "items") else ()
  for key, value in items:
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      check_finite(value, name + ".")
      continue
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, float) and not math.isfinite(v):
        raise ConfigError(f"config {name}={value} is not finite: give a finite number")


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """A config's `get_config(arg)` argument, 'r0=5,N=16', as typed values (big_vision's
  `configs/common.py:parse_arg`).

  `spec` maps each argument name to its default; the default's type converts the given
  string (a bool accepts true / false / '' in any case, and a bare name means true). A bare
  value alone ('paper.py:5') is the value of the first argument of `spec`. Raises
  ConfigError naming the item for a malformed or unconvertible item and for an unknown name.
  """
  return _parse(arg, spec, pass_on=False)[0]


def split_arg(arg: str | None, **spec: Any) -> tuple[ml_collections.ConfigDict, str | None]:
  """`parse_arg` for a config that builds on another: (the values of `spec`, the other items
  as one argument for that config, or None).

  Unlike `parse_arg`, a bare value alone that is no name of `spec` belongs to the other
  config (its first argument), so 'demo.py:5' and 'paper.py:5' mean the same r0.
  """
  return _parse(arg, spec, pass_on=True)


def _parse(
  arg: str | None, spec: dict[str, Any], pass_on: bool
) -> tuple[ml_collections.ConfigDict, str | None]:
  items = [item.strip() for item in (arg or "").split(",") if item.strip()]
  if len(items) == 1 and "=" not in items[0] and items[0] not in spec and spec and not pass_on:
    items = [f"{next(iter(spec))}={items[0]}"]
  given, rest, unknown = {}, [], []
  for item in items:
    key, sep, value = (s.strip() for s in item.partition("="))
    if key in spec and (sep or isinstance(spec[key], bool)):
      given[key] = value if sep else "true"
    elif pass_on:
      rest.append(item)
    elif not sep:
      raise ConfigError(f"config argument {item!r} is not of the form key=value")
    else:
      unknown.append(key)
  if unknown:
    raise ConfigError(f"unknown config arguments {sorted(unknown)}; known: {', '.join(spec)}")
  values = ml_collections.ConfigDict()
  for key, default in spec.items():
    values[key] = _convert(key, given[key], type(default)) if key in given else default
  return values, ",".join(rest) or None


def _convert(key: str, value: str, kind: type) -> Any:
  if kind is bool:
    if value.lower() not in ("true", "false", ""):
      raise ConfigError(f"config argument {key}={value!r} is not bool (true or false)")
    return value.lower() == "true"
  try:
    return kind(value)
  except ValueError:
    raise ConfigError(f"config argument {key}={value!r} is not {kind.__name__}") from None
