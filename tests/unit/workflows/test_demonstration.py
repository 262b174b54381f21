"""The demo's summary over re-runs."""

from __future__ import annotations

import json

from lsemil.workflows import demonstration


def _demo(timings: dict, rerun: dict | None = None) -> dict:
  demo = {"quick": True, "machine": "m", "bar": {"mean_auc": 0.75}, "timings_s": timings}
  demo |= {"runs": {}, "results_dir": "/r"} | ({"rerun_timings_s": rerun} if rerun else {})
  return demo


def test_a_rerun_keeps_the_first_runs_timings(tmp_path):
  path = tmp_path / "demo_summary.json"
  first = demonstration._timings(path, True, 240, {"train_s": 199.04, "total_s": 240.1})
  assert first == {"timings_s": {"train_s": 199.0, "total_s": 240.1}}
  path.write_text(json.dumps({"quick": True, "patients": 240, **first}))
  again = demonstration._timings(path, True, 240, {"train_s": 20.0, "total_s": 37.0})
  rerun = {"train_s": 20.0, "total_s": 37.0}
  assert again == {"timings_s": first["timings_s"], "rerun_timings_s": rerun}
  line = demonstration.format_summary(_demo(again["timings_s"], again["rerun_timings_s"]))
  assert "finished in 37 s" in line and "the first run took 240 s" in line
  # another mode or dataset in the same folder is a first run of its own
  assert "rerun_timings_s" not in demonstration._timings(path, False, 600, {"total_s": 817.0})
  path.write_text("{not json")
  assert "rerun_timings_s" not in demonstration._timings(path, True, 240, {"total_s": 37.0})
