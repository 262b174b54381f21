"""An exported model folder: weights in safetensors and the config in JSON, no orbax.

`lsemil export` writes one (`lsemil.workflows.release`); `lsemil.inference.engine.load` reads it
as it reads a training workdir, so `lsemil predict --checkpoint DIR`, `lsemil.load(DIR)` and
`lsemil train --config.train.init_from=DIR` take either. The two files this module owns:

  DIR/model.safetensors  every variable of the model ({'params', 'batch_stats'?}) under its
                         flattened name, `params/<module>/.../<leaf>` (`flatten`), float32,
                         written with `safetensors.flax`; the file's metadata holds the crc32
                         of each array (`lsemil.runtime.integrity.checksums`, JSON) under
                         `lsemil_crc32`
  DIR/config.json        {'format': 'lsemil-export', 'format_version', 'lsemil_version',
                         'arch', 'classes' (the K output columns, in order), 'input_size',
                         'model' (config.model), 'config' (the whole run config, as the
                         checkpoint stored it), 'step', 'source' (the checkpoint exported)}

Reading checks what a checkpoint read checks: the stored shapes against what the config
builds, no non-finite weight, every array's crc32; each refusal is one CheckpointError naming
the file and the variable.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import flax.traverse_util
import jax
import ml_collections
import numpy as np
import safetensors.flax

from lsemil.core import fileio
from lsemil.core.errors import CheckpointError
from lsemil.data import findings
from lsemil.models import mil, registry
from lsemil.runtime import integrity

FORMAT = "lsemil-export"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CRC_KEY = "lsemil_crc32"  # safetensors metadata: integrity.checksums of the variables, JSON
SEP = "/"


def is_bundle(path: str | os.PathLike) -> bool:
  """A folder holding model.safetensors (a training workdir never does)."""
  return (fileio.as_path(path) / WEIGHTS_FILE).exists()


def flatten(variables: dict) -> dict[str, np.ndarray]:
  """{'params': {'head': {'kernel': a}}} -> {'params/head/kernel': a} (host arrays)."""
  flat = flax.traverse_util.flatten_dict(dict(variables), sep=SEP)
  return {k: np.asarray(v) for k, v in flat.items()}


def write(
  out_dir: str | os.PathLike,
  config: ml_collections.ConfigDict,
  variables: dict,
  *,
  step: int,
  source: str,
  version: str,
) -> dict[str, Any]:
  """Writes DIR/model.safetensors and DIR/config.json; returns the config.json content."""
  out = fileio.as_path(out_dir)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  metadata = {"format": "flax", CRC_KEY: json.dumps(integrity.checksums(variables))}
  tensors = {k: jax.numpy.asarray(v) for k, v in flatten(variables).items()}
  fileio.write_bytes(out / WEIGHTS_FILE, safetensors.flax.save(tensors, metadata=metadata))
  head = {
    "format": FORMAT,
    "format_version": FORMAT_VERSION,
    "lsemil_version": version,
    "arch": registry.arch_of_config(config.model, saved=True),
    "classes": list(findings.of_config(config)),
    "input_size": int(config.model.input_size),
    "model": config.model.to_dict(),
    "config": config.to_dict(),
    "step": int(step),
    "source": str(source),
  }
  fileio.write_json(out / CONFIG_FILE, head)
  return head


def _metadata(data: bytes) -> dict[str, str]:
  """The `__metadata__` of a safetensors file's header (8-byte length, then JSON)."""
  (n,) = struct.unpack("<Q", data[:8])
  return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})


def read(path: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Any, dict, dict]:
  """(config, model, variables, info) of an exported folder; `variables` are host numpy
  arrays, info has 'checkpoint' (the folder), 'step', 'source' and 'which' ('export')."""
  root = fileio.as_path(path)
  head = fileio.read_json(root / CONFIG_FILE) if (root / CONFIG_FILE).exists() else None
  if not isinstance(head, dict) or head.get("format") != FORMAT:
    raise CheckpointError(f"{root / CONFIG_FILE}: missing or not the config of `lsemil export`")
  try:
    config = ml_collections.ConfigDict(dict(head["config"]))
    model = registry.from_config(config.model, saved=True)
    abstract = jax.eval_shape(lambda: mil.init_variables(model, jax.random.key(0)))
  except Exception as e:  # JSON, but not one of our configs
    raise CheckpointError(f"{root / CONFIG_FILE}: field 'config' builds no model: {e}") from e
  weights = root / WEIGHTS_FILE
  try:
    data = weights.read_bytes()
    flat = {k: np.asarray(v) for k, v in safetensors.flax.load(data).items()}
    stored = json.loads(_metadata(data)[CRC_KEY]) if CRC_KEY in _metadata(data) else None
  except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
    raise CheckpointError(f"{weights}: unreadable: {type(e).__name__}: {e}") from e
  abstract = {k: v for k, v in abstract.items() if k in ("params", "batch_stats")}
  want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(abstract, sep=SEP).items()}
  for key in sorted(set(want) | set(flat)):
    if want.get(key) != (flat[key].shape if key in flat else None):
      got = flat[key].shape if key in flat else None
      raise CheckpointError(
        f"{weights}: {key} is stored as {got}, the model of {CONFIG_FILE} has {want.get(key)}"
      )
  variables = flax.traverse_util.unflatten_dict(flat, sep=SEP)
  integrity.verify(weights, variables, stored, what="the exported model")
  info = {"checkpoint": str(root), "step": int(head.get("step", 0)), "which": "export"}
  info["source"] = head.get("source")
  return config, model, variables, info
