"""README's API example runs verbatim; the CLI dispatcher and `lsemil info` work."""

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

from lsemil.commands import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_readme_api_example_runs_verbatim(capsys, monkeypatch):
  text = (ROOT / "README.md").read_text()
  match = re.search(r"## API example\n\n```python\n(.*?)```", text, re.S)
  assert match, "README has no '## API example' python block"
  monkeypatch.chdir(ROOT)
  exec(compile(match.group(1), "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "(4, 14) (4, 16, 16, 14) [8, 16]" in out


def test_help_lists_every_command_and_each_module_has_main(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for name, (module, _) in cli.COMMANDS.items():
    assert name in out
    assert module == f"lsemil.commands.{name}"
    assert callable(getattr(importlib.import_module(module), "main", None)), module
  # The library modules behind the commands hold no command line of their own.
  for module in (
    "lsemil.workflows.evaluation",
    "lsemil.workflows.prediction",
    "lsemil.workflows.reproduction",
    "lsemil.workflows.demonstration",
    "lsemil.data.preparation",
    "lsemil.data.statistics",
    "lsemil.data.phantoms",
  ):
    lib = importlib.import_module(module)
    assert not hasattr(lib, "main") and not hasattr(lib, "build_parser"), module


def test_library_modules_never_import_command_modules():
  import ast

  for path in sorted((ROOT / "lsemil").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    if rel.startswith("lsemil/commands/"):
      continue
    for node in ast.walk(ast.parse(path.read_text(), rel)):
      if isinstance(node, ast.ImportFrom):
        names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      bad = [n for n in names if n in ("lsemil.commands.cli", "lsemil.commands")]
      bad += [n for n in names if n.startswith("lsemil.commands.")]
      assert not bad, f"{rel}:{node.lineno} imports {bad}"


def test_unknown_command_exits_2(capsys):
  assert cli.main(["nonsense"]) == 2
  assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_info_prints_versions_devices_and_model_size():
  out = subprocess.run(
    [sys.executable, "-m", "lsemil.commands.cli", "info", "--config", "smoke"],
    capture_output=True, text=True, check=True, cwd=ROOT,
  ).stdout
  assert re.search(r"^jax\s+\d", out, re.M)
  assert "cpu" in out
  assert re.search(r"params\s+15,380", out)
  gflops = float(re.search(r"forward\s+([\d.]+) GFLOPs/image", out).group(1))
  assert 0.001 < gflops < 0.1


@pytest.mark.parametrize("package", ["tensorflow", "tensorflow-cpu"])
def test_tensorflow_is_not_installed(package):
  import importlib.metadata

  with pytest.raises(importlib.metadata.PackageNotFoundError):
    importlib.metadata.version(package)
