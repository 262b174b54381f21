"""Checksums and finiteness of checkpointed weights (lsemil.runtime.integrity)."""

from __future__ import annotations

import numpy as np
import pytest

from lsemil.core.errors import CheckpointError
from lsemil.runtime import integrity


def _tree():
  return {"params": {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
          "batch_stats": {"mean": np.zeros(3, np.float32)}}


def test_intact_weights_verify():
  tree = _tree()
  integrity.verify("W/checkpoints/3", tree, integrity.checksums(tree))


def test_a_changed_finite_value_is_named_by_its_checksum():
  tree = _tree()
  stored = integrity.checksums(tree)
  tree["params"]["a"]["kernel"][1, 2] += 1e-6
  with pytest.raises(CheckpointError, match=r"step 3 is corrupt: \['params'\]\['a'\]\['kernel'\]"):
    integrity.verify("W/checkpoints/3", tree, stored)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_value_is_named_first(bad):
  tree = _tree()
  stored = integrity.checksums(tree)
  tree["batch_stats"]["mean"][0] = bad
  with pytest.raises(CheckpointError, match=r"step 3 holds non-finite weights: \['batch_stats'\]"):
    integrity.verify("W/checkpoints/3", tree, stored)


def test_without_checksums_only_finiteness_is_checked():
  tree = _tree()
  integrity.verify("W/checkpoints/3", tree, None)
  tree["params"]["a"]["kernel"][0, 0] = np.nan
  with pytest.raises(CheckpointError, match="non-finite"):
    integrity.verify("W/checkpoints/3", tree, None)
