"""The public API: `lsemil.NAME` for every name README's API sections use, and `__all__`.

`lsemil/__init__.py` names each public name three times (the typed imports, `__all__`, the
lazy table `_EXPORTS`); they must agree, and each must be the object its module defines.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import lsemil

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _api_sections() -> str:
  """README's '## API...' sections (the name list and the example), headings to next '## '."""
  text = (ROOT / "README.md").read_text()
  parts = re.findall(r"^## API.*?(?=^## (?!API))", text + "\n## end\n", re.S | re.M)
  assert parts, "README has no '## API' section"
  return "".join(parts)


def test_readme_api_names_import():
  names = set(re.findall(r"\blsemil\.([A-Za-z_][A-Za-z0-9_]*)\b", _api_sections()))
  assert {"lse_lba", "load_config", "from_config"} <= names, names
  missing = sorted(n for n in names if not hasattr(lsemil, n))
  assert not missing, f"README names lsemil.{missing} which lsemil does not export"
  unlisted = sorted(names - set(lsemil.__all__))
  assert not unlisted, f"README uses {unlisted} outside lsemil.__all__"


def test_all_names_import_from_their_modules():
  for name in lsemil.__all__:
    value = getattr(lsemil, name)
    if name == "__version__":
      assert isinstance(value, str)
      continue
    module = importlib.import_module(lsemil._SOURCES[name])
    assert value is getattr(module, name), name
    exec(f"from lsemil import {name}", {})


def test_typed_imports_all_and_lazy_table_agree():
  tree = ast.parse((ROOT / "lsemil" / "__init__.py").read_text())
  typed = {
    (node.module, a.name)
    for node in ast.walk(tree)
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lsemil")
    for a in node.names
  }
  lazy = {(module, name) for module, names in lsemil._EXPORTS.items() for name in names}
  assert typed == lazy
  assert sorted(n for _, n in lazy) == sorted(set(lsemil.__all__) - {"__version__"})
  assert len(lsemil.__all__) == len(set(lsemil.__all__))


def test_import_lsemil_stays_free_of_jax():
  code = "import sys, lsemil; print(sorted({'jax', 'flax', 'numpy'} & set(sys.modules)))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
