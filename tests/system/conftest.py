"""System tests: real `lsemil` processes, several processes, the GCS server, headless Chromium,
the demo, the TPU scripts. Every test under tests/system is marked `slow` here (the quick loop
is `pytest tests/unit`).

The one way these tests start `lsemil` is the `lsemil` fixture (an `Lsemil`): `lsemil(*args)`
runs the CLI and asserts it succeeded, `lsemil.run(*args)` runs it and returns the process
whatever its exit status, `lsemil.popen(*args)` starts it, `lsemil.together(procs)` reads
the output of processes that run together (one multi-host run), and `lsemil.env(...)` is the
environment a subprocess gets (the CPU backend, unbuffered output, optionally a JAX cache of
its own and a number of host devices). `chromium` is the headless Chromium executable of the
browser tests (they skip where there is none).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:
  for item in items:
    if HERE in Path(item.path).resolve().parents:
      item.add_marker(pytest.mark.slow)


class Lsemil:
  """Runs the `lsemil` command line in subprocesses (see the module docstring)."""

  repo = REPO

  def __init__(self, venv_dir: Path | None = None):
    """The source tree's lsemil; with `venv_dir`, the `lsemil` entry point installed there."""
    self.venv = venv_dir
    self.executable = str(venv_dir / "bin" / "python") if venv_dir else sys.executable
    source_cli = (sys.executable, "-m", "lsemil.commands.cli")
    self.argv = (str(venv_dir / "bin" / "lsemil"),) if venv_dir else source_cli

  @staticmethod
  def env(cache: Path | None = None, *, devices: int | None = None, **extra: str) -> dict:
    """os.environ with the CPU backend and unbuffered output; with `cache`, a persistent
    compilation cache there that keeps every program, with cheaper CPU compiles (every
    process sharing the cache must use the same settings); with `devices`, that many host
    devices; `extra` is set last."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if cache is not None:
      env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
      )
    if devices is not None:
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env

  def command(self, *args) -> list[str]:
    return [*self.argv, *map(str, args)]

  def run(
    self, *args, cwd=REPO, cache=None, env=None, home=None, timeout: float = 600
  ) -> subprocess.CompletedProcess:
    """`lsemil *args` to completion, output captured; any exit status."""
    env = env if env is not None else self.env(cache)
    if home is not None:
      env = dict(env, HOME=str(home))
    return subprocess.run(
      self.command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )

  def __call__(self, *args, **kwargs) -> subprocess.CompletedProcess:
    """`lsemil.run(*args, ...)` that must exit 0 (else the failure shows its stderr)."""
    proc = self.run(*args, **kwargs)
    shown = " ".join(map(str, args))
    assert proc.returncode == 0, f"lsemil {shown} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc

  @staticmethod
  def one_error(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one error line `lsemil <command>: ...` of a run that failed with exit status 1
    and no traceback (asserted), returned."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith(f"lsemil {command}:")]
    assert len(errors) == 1, out[-3000:]
    return errors[0]

  def popen(self, *args, cwd=REPO, cache=None, env=None, **kwargs) -> subprocess.Popen:
    """`lsemil *args` started; stdout and stderr piped as text unless `kwargs` say otherwise."""
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | kwargs
    env = env if env is not None else self.env(cache)
    return subprocess.Popen(self.command(*args), cwd=cwd, env=env, **kwargs)

  def python(self, code: str, *args, cwd=REPO, cache=None, env=None, **kwargs):
    """`python -c code *args` started like `popen` (a driver script of a test)."""
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | kwargs
    env = env if env is not None else self.env(cache)
    argv = [self.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(argv, cwd=cwd, env=env, **kwargs)


  @staticmethod
  def together(procs) -> Together:
    """The processes of one multi-host run, every pipe read from now on (see `Together`)."""
    return Together(procs)


class Together:
  """Processes that run together, with all their pipes read at once from the start. Read one
  after the other, the unread pipe of a chatty process could fill (64 KiB) and block it,
  and the others would wait for it at their next barrier until jax's shutdown barrier
  (5 min) aborts them all, the way a loaded run of the multi-host preemption test ended
  (its cause is not established: that process normally writes nothing to stderr)."""

  def __init__(self, procs):
    self.procs = list(procs)
    self._pool = concurrent.futures.ThreadPoolExecutor(len(self.procs))
    self._outputs = [self._pool.submit(p.communicate) for p in self.procs]

  def wait(self, timeout: float) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process once all have exited; after `timeout`
    seconds all are killed and the test fails with their output."""
    _, pending = concurrent.futures.wait(self._outputs, timeout=timeout)
    for p in self.procs if pending else ():
      p.kill()
    outs = [f.result() for f in self._outputs]
    self._pool.shutdown()
    logs = [(p.returncode, out, err) for p, (out, err) in zip(self.procs, outs, strict=True)]
    assert not pending, f"killed after {timeout} s:\n" + self.shown([e for *_, e in logs])
    return logs

  @staticmethod
  def shown(errs: list[str], keep: int = 4000) -> str:
    """Each process's stderr for a failure message: the end, without the stack frames of
    jax's abort (so that an abort still shows what each process did before it)."""
    frames = re.compile(r"^\s*@\s+0x[0-9a-f]+ ", re.M)
    kept = ["\n".join(x for x in e.splitlines() if not frames.match(x)) for e in errs]
    return "\n".join(f"--- process {i}:\n{e[-keep:]}" for i, e in enumerate(kept))

  def errors(self, timeout: float) -> tuple[list[int], list[str]]:
    """The return codes and the stderr of each process, once all have exited."""
    logs = self.wait(timeout)
    return [rc for rc, *_ in logs], [err for *_, err in logs]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
  """The one compilation cache of the subprocesses started with `cache=jax_cache` (cheaper
  compiles, see `Lsemil.env`) for the whole run: the smoke steps a module compiled are cache
  hits in every later module. xdist workers share it (a folder of tests/conftest.py's cache,
  removed with it); jax's file lock makes concurrent use safe."""
  base = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  path = Path(base) / "cheap-compiles" if base else tmp_path_factory.mktemp("jax_cache")
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="session")
def lsemil() -> Lsemil:
  """Runs the `lsemil` CLI (and driver scripts) in subprocesses: see `Lsemil`."""
  return Lsemil()


# What the build reads (pyproject.toml names README.md as the readme); copied so that the
# build writes its build/ and egg-info into a temporary folder, not into the source tree.
SOURCES = ("pyproject.toml", "README.md", "lsemil", "configs")


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Lsemil:
  """A fresh virtualenv V with a regular (non-editable) install of the source, returned:
  `pip --python V/bin/python install --no-deps --no-build-isolation --no-index SRC`. V gets
  the test environment's packages through a .pth line (its dependencies, not its editable
  lsemil: .pth files are not read from a folder a .pth adds), so nothing is downloaded. Run
  `V/bin/lsemil` (the installed entry point) from any directory: the returned `Lsemil` does."""
  tmp_path = tmp_path_factory.mktemp("install")
  src, venv_dir = tmp_path / "src", tmp_path / "venv"
  src.mkdir()
  for name in SOURCES:
    path = REPO / name
    if path.is_dir():
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy2(path, src / name)
  venv.create(venv_dir, with_pip=False)
  python = venv_dir / "bin" / "python"
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  Path(site, "_test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
  pip += ["--no-build-isolation", "--no-index", "--quiet", str(src)]
  proc = subprocess.run(pip, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"pip install failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return Lsemil(venv_dir)


@pytest.fixture(scope="session")
def chromium() -> str:
  """The headless Chromium executable; skips where there is none or it cannot run."""
  names = ("chromium", "chromium-browser", "google-chrome", "chrome")
  exe = next(filter(None, map(shutil.which, names)), None)
  if exe is None:
    pytest.skip("headless Chromium not found (Debian: apt-get install chromium; .ci/run does)")
  try:
    v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired) as e:
    pytest.skip(f"{exe} cannot be run: {e}")
  if v.returncode != 0:
    pytest.skip(f"{exe} --version failed: {v.stderr.strip()[:200]}")
  return exe
