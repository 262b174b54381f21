"""`lsemil aot` as a preflight: the smoke config compiled for v5e:2x2 in a real process,
checked against a capacity it cannot fit (needs the tpu extra; skipped without it). The
same program as tests/unit/training/test_compilation.py's (8 per chip), so a shared
persistent compilation cache may serve it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("libtpu", reason="the tpu extra (jax[tpu]) is not installed")


def test_oversized_config_is_reported_and_fails(lsemil, tmp_path):
  out = tmp_path / "aot.json"
  proc = lsemil.run(
    "aot", "--config", "smoke", "--topology", "v5e:2x2", "--per-chip-batch", "8",
    "--hbm-bytes", "1000000", "--json", str(out), "--set", "model.up_impl=split",
  )  # fmt: skip
  error = lsemil.one_error(proc, "aot")
  assert "smoke at 8 per chip does not fit on v5e:2x2" in error and "976.56 KiB" in error
  assert "| train | 8 |" in proc.stdout and "mesh data=4 x model=1" in proc.stdout
  assert "E0000" not in proc.stderr  # libtpu's start-up errors are quieted
  report = json.loads(out.read_text())
  assert report["fits"] is False and report["train"]["fits"] is False
  assert report["hbm_capacity"] == 1_000_000 and report["global_batch"] == 32
  # The model's auto options resolve for the TPU (--set: the same choice, the same program).
  assert (report["up_impl"], report["dense_impl"], report["remat"]) == ("split", "split", "off")
  assert "dense blocks split, up path split, remat off" in proc.stdout
  total = report["train"]["hbm"]["total"]
  assert report["train"]["headroom_bytes"] == 1_000_000 - total < 0
