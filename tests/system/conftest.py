"""System tests: real `lsemil` processes, several processes, the GCS server, headless Chromium,
the demo, the TPU scripts. Every test under tests/system is marked `slow` here (the quick loop
is `pytest tests/unit`).

The one way these tests start `lsemil` is the `lsemil` fixture (an `Lsemil`): `lsemil(*args)`
runs the CLI and asserts it succeeded, `lsemil.run(*args)` runs it and returns the process
whatever its exit status, `lsemil.popen(*args)` starts it, and `lsemil.env(...)` is the
environment a subprocess gets (the CPU backend, unbuffered output, optionally a JAX cache of
its own and a number of host devices).
"""

from __future__ import annotations

import os
import subprocess
import sys
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
  argv = (sys.executable, "-m", "lsemil.commands.cli")

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

  def popen(self, *args, cwd=REPO, cache=None, env=None, **kwargs) -> subprocess.Popen:
    """`lsemil *args` started; stdout and stderr piped as text unless `kwargs` say otherwise."""
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | kwargs
    env = env if env is not None else self.env(cache)
    return subprocess.Popen(self.command(*args), cwd=cwd, env=env, **kwargs)

  def python(self, code: str, *args, cwd=REPO, cache=None, env=None, **kwargs):
    """`python -c code *args` started like `popen` (a driver script of a test)."""
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True} | kwargs
    env = env if env is not None else self.env(cache)
    argv = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(argv, cwd=cwd, env=env, **kwargs)


@pytest.fixture(scope="session")
def lsemil() -> Lsemil:
  """Runs the `lsemil` CLI (and driver scripts) in subprocesses: see `Lsemil`."""
  return Lsemil()
