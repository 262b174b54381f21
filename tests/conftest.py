"""Shared pytest fixtures: the NIH metadata folder and a small synthetic NIH-layout dataset.

`nih_metadata_dir` is the folder named by env `LSEMIL_NIH_METADATA` (default
`<repo root>/../shared/data/nih_metadata`); tests that use it skip when it is absent.
`synth_dir` runs the synthesizer (lsemil.data.synth, issue 3 section 4) once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def nih_metadata_dir() -> Path:
  """The real NIH ChestX-ray14 metadata folder (CSV and list files, no images), or skip."""
  default = REPO_ROOT.parent / "shared" / "data" / "nih_metadata"
  path = Path(os.environ.get("LSEMIL_NIH_METADATA", default))
  if not path.is_dir() or not any(path.glob("Data_Entry_2017*.csv*")):
    pytest.skip(f"NIH metadata not found at {path} (set LSEMIL_NIH_METADATA to the folder)")
  return path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
  """A small synthetic NIH-layout dataset (40 patients, 512 px, seed 0), built once."""
  from lsemil.data.synth import synthesize

  out = tmp_path_factory.mktemp("synth") / "nih"
  return synthesize(out, patients=40, size=512, seed=0, workers=1)
