"""The layering: library modules at the bottom, command modules on top, no import circle.

Read from the source with `ast` (imports inside functions count too):
- no library module imports a command module (`lsemil.commands.*`, `lsemil.commands.cli`);
- command modules are imported by `lsemil.commands.cli` only;
- no module imports another module's `_private` name;
- the import graph of the library has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lsemil"


def _modules() -> dict[str, Path]:
  out = {}
  for path in PKG.rglob("*.py"):
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, str | None]]:
  """(module, imported name or None) for every lsemil import in the file."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(a.name, None) for a in node.names if a.name.startswith("lsemil")]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lsemil"):
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        found.append((sub, None) if sub in MODULES else (node.module, a.name))
  return found


def _is_command(name: str) -> bool:
  return name == "lsemil.commands.cli" or name.startswith("lsemil.commands")


def test_library_modules_never_import_commands():
  bad = [
    (m, dep)
    for m, path in MODULES.items()
    if not _is_command(m)
    for dep, _ in _imports(path)
    if _is_command(dep)
  ]
  assert not bad, f"library modules importing commands: {bad}"


def test_command_modules_are_imported_by_the_cli_only():
  bad = [
    (m, dep)
    for m, path in MODULES.items()
    if m != "lsemil.commands.cli"
    for dep, _ in _imports(path)
    if dep.startswith("lsemil.commands.") and dep != "lsemil.commands.arguments"
  ]
  assert not bad, f"command modules imported outside the CLI: {bad}"


def test_no_private_names_across_modules():
  bad = [
    (m, dep, name)
    for m, path in MODULES.items()
    for dep, name in _imports(path)
    if name is not None and name.startswith("_") and not name.startswith("__") and dep != m
  ]
  assert not bad, f"imports of another module's private names: {bad}"


def test_no_import_cycle():
  graph = {m: {d for d, _ in _imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}
  for pkg in [m for m in graph if (MODULES[m].name == "__init__.py")]:
    graph[pkg] = set()  # a package's __init__ re-exports; its children import it implicitly
  state: dict[str, int] = {}

  def visit(m: str, stack: list[str]) -> None:
    state[m] = 1
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
      if d not in state:
        visit(d, [*stack, d])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])


def test_the_checks_can_fail(tmp_path):
  """The parser sees what the checks look for (a guard against a check that sees nothing)."""
  src = tmp_path / "x.py"
  src.write_text("from lsemil.commands import evaluate\nfrom lsemil.training.trainer import _finite\n")
  assert ("lsemil.commands.evaluate", None) in _imports(src)
  assert ("lsemil.training.trainer", "_finite") in _imports(src)
