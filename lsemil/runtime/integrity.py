"""Checksums and finiteness of checkpointed weights (no orbax here).

`lsemil.runtime.checkpointing` stores `checksums(model_item)` with every step (item
`checksums/`: parameter path -> crc32 of the array's bytes, computed from the host copy) and
`verify` checks what it reads back: a non-finite weight, or one whose bytes differ from the
stored checksum (a bit flip that keeps the value finite), is a `CheckpointError` naming the
step and the parameter. Steps saved before checksums existed are checked for finiteness
only, with a note.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np

from lsemil.core import log
from lsemil.core.errors import CheckpointError

ITEM = "checksums"  # the step's item holding {"crc32": {path: hex}}


def _host(x: Any) -> np.ndarray | None:
  """The whole array on this host; None when no process holds all of it (sharded)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else None
  return np.asarray(x)


def _leaves(tree: Any) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(k), v) for k, v in jax.tree.leaves_with_path(tree)]


def _crc(a: np.ndarray) -> str:
  return f"{zlib.crc32(np.ascontiguousarray(a).tobytes()) & 0xFFFFFFFF:08x}"


def checksums(tree: Any) -> dict:
  """{"crc32": {parameter path: crc32 hex}} of the arrays of `tree` (JSON-ready)."""
  out = {}
  for path, x in _leaves(tree):
    a = _host(x)
    if a is not None:
      out[path] = _crc(a)
  return {"crc32": out}


def verify(step_dir: Any, tree: Any, stored: dict | None, *, what: str | None = None) -> None:
  """Raises CheckpointError naming the step and the first non-finite parameter, or the first
  whose bytes differ from `stored` (`checksums` at save time; None: not checked, a note).
  `what` names the weights in the message (default 'checkpoint step <last part of step_dir>';
  an exported model.safetensors is 'the exported model')."""
  step = str(step_dir).rstrip("/").rsplit("/", 1)[-1]  # W/checkpoints/<step>, gs:// too
  what = what or f"checkpoint step {step}"
  leaves = [(path, _host(x)) for path, x in _leaves(tree)]
  for path, a in leaves:
    if a is not None and np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
      raise CheckpointError(
        f"{step_dir}: {what} holds non-finite weights: {path} "
        f"({int(np.size(a) - np.isfinite(a).sum())} of {np.size(a)} values NaN/inf)"
      )
  if stored is None:
    log.info(f"note: {step_dir} has no checksums (saved before they existed); not verified")
    return
  crcs = stored.get("crc32", {})
  for path, a in leaves:
    if a is not None and path in crcs and crcs[path] != _crc(a):
      raise CheckpointError(
        f"{step_dir}: {what} is corrupt: {path} does not match its checksum "
        f"(stored crc32 {crcs[path]}, read {_crc(a)})"
      )
