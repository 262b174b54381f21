"""The layering, read from the source with `ast` (imports inside functions count too).

Packages are layers, bottom to top: core < data < models < metrics < runtime < inference <
training < reporting < workflows < commands.
- a module imports modules of its own layer or lower ones only (commands may import anything;
  `lsemil/__init__.py`, the public API, may re-export from any layer; `lsemil.configs`, the
  named configs in configs/, imports `lsemil.core` only);
- `lsemil.data`, `lsemil.metrics` and `lsemil.reporting` import no jax, flax, optax or orbax;
- command modules (one verb each, with a `main`) are imported by `lsemil.commands.cli` only,
  and no library module shares a file stem with a module of lsemil/commands/;
- no `import ... as` renames an lsemil module (in lsemil/, configs/, tests/, benchmarks/);
- no module imports another module's `_private` name; the import graph has no cycle;
- pyproject's `packages` are the package folders under lsemil/ plus `lsemil.configs`.
Each check is a function of the source tree, so `test_the_checks_can_fail` runs it on a small
tree with one violation.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = (
  "core", "data", "models", "metrics", "runtime", "inference", "training", "reporting",
  "workflows", "commands",
)  # fmt: skip
NO_JAX_LAYERS = ("data", "metrics", "reporting")
JAX_FAMILY = ("jax", "jaxlib", "flax", "optax", "orbax")


def modules(repo: Path = REPO) -> dict[str, Path]:
  """Dotted name -> file for every module of lsemil/ and of configs/ (as lsemil.configs)."""
  out = {}
  for path in sorted((repo / "lsemil").rglob("*.py")):
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  for path in sorted((repo / "configs").glob("*.py")):
    name = "lsemil.configs" if path.stem == "__init__" else f"lsemil.configs.{path.stem}"
    out[name] = path
  return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
  """(module, imported name or None) for every lsemil import in the file."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "lsemil"]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lsemil":
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        found.append((sub, None) if sub in known else (node.module, a.name))
  return found


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None  # None: the top package, lsemil/__init__.py


def layer_violations(repo: Path = REPO) -> list[tuple[str, str]]:
  known = modules(repo)
  bad = []
  for m, path in known.items():
    layer = _layer(m)
    if layer is None or layer == "commands":
      continue  # the public API and the commands may import any layer
    for dep, _ in imports(path, known):
      dep_layer = _layer(dep)
      if layer == "configs":
        ok = dep_layer == "core"
      else:
        ok = dep_layer in LAYERS and LAYERS.index(dep_layer) <= LAYERS.index(layer)
      if not ok:
        bad.append((m, dep))
  return bad


def jax_imports(repo: Path = REPO) -> list[tuple[str, str]]:
  bad = []
  for m, path in modules(repo).items():
    if _layer(m) not in NO_JAX_LAYERS:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module]
      bad += [(m, n) for n in names if n.split(".")[0] in JAX_FAMILY]
  return bad


def _defines_main(path: Path) -> bool:
  tree = ast.parse(path.read_text())
  return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)


def command_imports(repo: Path = REPO) -> list[tuple[str, str]]:
  """Imports of a command module (a module of lsemil.commands with a `main`: one verb)
  outside lsemil.commands.cli; the commands' shared helpers (arguments, ...) have none."""
  known = modules(repo)
  verbs = {
    m for m, p in known.items() if m.startswith("lsemil.commands.") and m != "lsemil.commands.cli"
    and _defines_main(p)
  }  # fmt: skip
  return [
    (m, dep)
    for m, path in known.items()
    if m != "lsemil.commands.cli"
    for dep, _ in imports(path, known)
    if dep in verbs
  ]


def stems_shared_with_commands(repo: Path = REPO) -> list[str]:
  commands = repo / "lsemil" / "commands"
  verbs = {p.stem for p in commands.glob("*.py")} - {"__init__"}
  return sorted(
    str(p.relative_to(repo))
    for p in (repo / "lsemil").rglob("*.py")
    if commands not in p.parents and p.stem in verbs
  )


def module_renames(repo: Path = REPO) -> list[str]:
  """`import lsemil.x as y` / `from lsemil.x import module as y` in lsemil/, configs/,
  tests/ and benchmarks/."""
  known = modules(repo)
  bad = []
  for folder in ("lsemil", "configs", "tests", "benchmarks"):
    for path in sorted((repo / folder).rglob("*.py")):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
          renamed = [a for a in node.names if a.asname and a.name.split(".")[0] == "lsemil"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lsemil":
          renamed = [a for a in node.names if a.asname and f"{node.module}.{a.name}" in known]
        else:
          continue
        bad += [f"{path.relative_to(repo)}:{node.lineno} {a.name} as {a.asname}" for a in renamed]
  return bad


def private_imports(repo: Path = REPO) -> list[tuple[str, str, str]]:
  known = modules(repo)
  return [
    (m, dep, name)
    for m, path in known.items()
    for dep, name in imports(path, known)
    if name is not None and name.startswith("_") and not name.startswith("__") and dep != m
  ]


def import_cycle(repo: Path = REPO) -> list[str]:
  """One import cycle (module names, first = last), or []."""
  known = modules(repo)
  graph = {m: {d for d, _ in imports(p, known) if d in known and d != m} for m, p in known.items()}
  for pkg in [m for m in graph if known[m].name == "__init__.py"]:
    graph[pkg] = set()  # a package's __init__ re-exports; its children import it implicitly
  state: dict[str, int] = {}

  def visit(m: str, stack: list[str]) -> list[str]:
    state[m] = 1
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        return [*stack[stack.index(d) :], d]
      if d not in state and (cycle := visit(d, [*stack, d])):
        return cycle
    state[m] = 2
    return []

  for m in sorted(graph):
    if m not in state and (cycle := visit(m, [m])):
      return cycle
  return []


def package_list_mismatch(repo: Path = REPO) -> tuple[list[str], list[str]]:
  """(pyproject's packages, the package folders under lsemil/ plus lsemil.configs) if they
  differ, else two empty lists."""
  listed = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
  folders = [
    ".".join(p.parent.relative_to(repo).parts) for p in (repo / "lsemil").rglob("__init__.py")
  ]
  want = sorted([*folders, "lsemil.configs"])
  return ([], []) if sorted(listed) == want else (sorted(listed), want)


# --------------------------------------------------------------------------- the repository


def test_each_layer_imports_its_own_layer_or_lower_ones():
  assert not layer_violations(), f"imports of a higher layer: {layer_violations()}"


def test_data_metrics_and_reporting_import_no_jax():
  assert not jax_imports(), f"jax/flax/optax/orbax imported: {jax_imports()}"


def test_command_modules_are_imported_by_the_cli_only():
  assert not command_imports(), f"command modules imported outside the CLI: {command_imports()}"


def test_no_library_module_is_named_like_a_command():
  assert not stems_shared_with_commands()


def test_no_import_renames_an_lsemil_module():
  assert not module_renames()


def test_no_private_names_across_modules():
  assert not private_imports(), f"imports of another module's private names: {private_imports()}"


def test_no_import_cycle():
  assert not import_cycle(), "import cycle: " + " -> ".join(import_cycle())


def test_pyproject_lists_every_package():
  assert package_list_mismatch() == ([], [])


# --------------------------------------------------------------------------- the checks fail


def _tree(root: Path, files: dict[str, str]) -> Path:
  """A repository with a clean two-layer lsemil/, configs/ and pyproject, plus `files`."""
  base = {
    "lsemil/__init__.py": "from lsemil.metrics import overlap\n",
    "lsemil/core/__init__.py": "",
    "lsemil/core/errors.py": "",
    "lsemil/metrics/__init__.py": "",
    "lsemil/metrics/overlap.py": "import numpy\nfrom lsemil.core import errors\n",
    "lsemil/commands/__init__.py": "",
    "lsemil/commands/cli.py": "from lsemil.commands import train\n",
    "lsemil/commands/train.py": "from lsemil.metrics import overlap\ndef main(): pass\n",
    "configs/__init__.py": "",
    "configs/smoke.py": "from lsemil.core import errors\n",
    "tests/test_x.py": "from lsemil.metrics import overlap\n",
    "benchmarks/b.py": "",
    "pyproject.toml": '[tool.setuptools]\npackages = ["lsemil", "lsemil.core", "lsemil.metrics",'
    ' "lsemil.commands", "lsemil.configs"]\n',
  }
  for rel, text in {**base, **files}.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(text)
  return root


CHECKS = [layer_violations, jax_imports, command_imports, stems_shared_with_commands,
          module_renames, private_imports, import_cycle]  # fmt: skip


def test_the_checks_pass_on_a_clean_tree(tmp_path):
  root = _tree(tmp_path, {})
  assert [check.__name__ for check in CHECKS if check(root)] == []
  assert package_list_mismatch(root) == ([], [])


def test_the_checks_can_fail(tmp_path):
  violations = {
    layer_violations: {"lsemil/core/errors.py": "from lsemil.metrics import overlap\n"},
    jax_imports: {"lsemil/metrics/overlap.py": "def f():\n  import jax.numpy\n"},
    command_imports: {"lsemil/metrics/overlap.py": "from lsemil.commands import train\n"},
    stems_shared_with_commands: {"lsemil/metrics/train.py": ""},
    module_renames: {"tests/test_x.py": "from lsemil.metrics import overlap as ov\n"},
    private_imports: {"lsemil/metrics/overlap.py": "from lsemil.core.errors import _x\n"},
    import_cycle: {
      "lsemil/core/errors.py": "from lsemil.core import fileio\n",
      "lsemil/core/fileio.py": "from lsemil.core import errors\n",
    },
  }
  for k, (check, files) in enumerate(violations.items()):
    assert check(_tree(tmp_path / str(k), files)), check.__name__
  configs_up = _tree(tmp_path / "c", {"configs/smoke.py": "from lsemil.metrics import overlap\n"})
  assert layer_violations(configs_up) == [("lsemil.configs.smoke", "lsemil.metrics.overlap")]
  missing = _tree(tmp_path / "p", {"lsemil/runtime/__init__.py": ""})
  assert package_list_mismatch(missing) != ([], [])
