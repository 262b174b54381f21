"""The exported folder's weights and config (lsemil.runtime.bundle): a round trip, and every
refusal one CheckpointError naming the file."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lsemil.core import configuration
from lsemil.core.errors import CheckpointError
from lsemil.inference import engine
from lsemil.models import registry
from lsemil.runtime import bundle


@pytest.fixture(scope="module")
def smoke(random_variables):
  config = configuration.load_config("smoke")
  return config, random_variables(registry.from_config(config.model), seed=3)


def _write(tmp_path, smoke, variables=None):
  config, good = smoke
  bundle.write(tmp_path, config, variables or good, step=7, source="W/checkpoints/7", version="t")
  return tmp_path


def test_round_trip_through_engine_load(tmp_path, smoke):
  config, variables = smoke
  out = _write(tmp_path, smoke)
  head = json.loads((out / bundle.CONFIG_FILE).read_text())
  assert head["classes"][0] == "Atelectasis" and head["input_size"] == config.model.input_size
  assert head["model"]["r0"] == config.model.r0 and head["step"] == 7
  assert "params/head/kernel" in bundle.flatten(variables)
  assert bundle.is_bundle(out) and not bundle.is_bundle(tmp_path / "nothing")
  loaded = engine.load(out)
  assert loaded.step == 7 and loaded.info["which"] == "export"
  assert loaded.config.model.to_dict() == json.loads(json.dumps(config.model.to_dict()))
  a, b = jax.tree.leaves_with_path(variables), jax.tree.leaves_with_path(loaded.variables)
  assert [k for k, _ in a] == [k for k, _ in b]
  for (_, x), (_, y) in zip(a, b, strict=True):
    assert isinstance(y, np.ndarray) and y.dtype == x.dtype
    np.testing.assert_array_equal(x, y)


def test_refuses_non_finite_weights(tmp_path, smoke):
  bad = jax.tree.map(np.copy, smoke[1])
  bad["params"]["head"]["kernel"][0, 0, 0, 0] = np.nan
  out = _write(tmp_path, smoke, bad)
  with pytest.raises(
    CheckpointError,
    match=r"model.safetensors: the exported model holds "
    r"non-finite weights: \['params'\]\['head'\]\['kernel'\] \(1 of",
  ):
    engine.load(out)


def test_refuses_changed_bytes_and_shapes(tmp_path, smoke):
  out = _write(tmp_path, smoke)
  path = out / bundle.WEIGHTS_FILE
  data = bytearray(path.read_bytes())
  data[-3] ^= 0x01  # the last bytes are a weight's: a flipped bit that stays finite
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="the exported model is corrupt: .* checksum"):
    bundle.read(out)
  config, variables = smoke
  other = configuration.load_config("smoke")
  other.model.up_features = 8
  bundle.write(out, other, variables, step=1, source="s", version="t")
  shape = r"model.safetensors: (params|batch_stats)/.* is stored as \(16,\), the model"
  with pytest.raises(CheckpointError, match=shape):
    bundle.read(out)
  path.write_bytes(b"not a safetensors file")
  with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
    bundle.read(out)
  (out / bundle.CONFIG_FILE).write_text("{}")
  with pytest.raises(CheckpointError, match="config.json: missing or not the config"):
    bundle.read(out)
