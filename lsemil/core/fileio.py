"""Files, local or remote (gs://), written so that no reader ever sees half a file.

One place for what every command needs: path resolution at a command's entry (relative,
`~`, absolute, `gs://`), atomic writes (temp name + rename locally; object stores write a
whole object at once), strict JSON (NaN / inf -> null) and reading it back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
  """A URL-like path (gs://, s3://, any scheme://)."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> str:
  """The absolute form of a user-given path: `~` expanded and relative paths made absolute
  (orbax and the workers need absolute paths), symlinks kept as named; a URL is returned
  as written, less a trailing slash."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))  # no symlink resolution: names stay


def as_path(path: str | os.PathLike) -> epath.Path:
  """An etils.epath.Path of the resolved path (local or remote)."""
  return epath.Path(resolve(path))


def temp_name(path: str | os.PathLike) -> Path:
  """`.<hash of the name>.<pid>.tmp` beside a local `path`: short whatever the name's length
  (a 255-byte file name stays writable), and matched by a `.*.tmp` clean-up."""
  path = Path(path)
  digest = hashlib.sha1(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
  return path.with_name(f".{digest}.{os.getpid()}.tmp")


def write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
  """Writes a whole file, atomically (temp name + rename when local); parents are created."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_bytes(data)  # an object store publishes a whole object at once
    return path
  tmp = temp_name(path)
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  return path


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
  """Plain JSON types: numpy -> Python, NaN / inf -> None, tuples -> lists, keys -> str."""
  if isinstance(obj, np.ndarray | np.generic):
    obj = obj.tolist()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, Mapping):
    return {str(k): json_safe(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return [json_safe(v) for v in obj]
  return obj


def to_json(obj: Any, indent: int | None = 1) -> str:
  """Strict JSON text (NaN / inf -> null), newline-terminated."""
  return json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> epath.Path:
  return write_text(path, to_json(obj, indent))


def none_to_nan(obj: Any) -> Any:
  """The inverse of `json_safe` for numeric leaves: None -> NaN, recursively."""
  if obj is None:
    return float("nan")
  if isinstance(obj, Mapping):
    return {k: none_to_nan(v) for k, v in obj.items()}
  return obj


def read_json(path: str | os.PathLike) -> Any:
  """A JSON file; raises OutputError naming the path if it is missing or malformed."""
  from lsemil.core.errors import OutputError

  path = as_path(path)
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise OutputError(f"{path}: cannot read JSON ({e})") from e
