"""The progress of training lanes: epochs over all jobs (the subprocesses are
tests/system/test_lanes.py's)."""

from __future__ import annotations

import json

from lsemil.workflows import lanes


def test_lanes_count_epochs_over_finished_and_running_jobs(tmp_path):
  jobs = [lanes.Job(k, "demo", tmp_path / k, tmp_path, epochs=10) for k in ("a", "b", "c")]
  (tmp_path / "b").mkdir()
  lines = [{"kind": "train", "epoch": 2.5, "step": 5}, {"kind": "valid", "epoch": 9.0}]
  (tmp_path / "b" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  epochs = {job.key: lanes._num_epochs(job) for job in jobs}
  # a finished, b running at epoch 2.5 (its last train line), c not started
  done = lanes._epochs_done(jobs, {"b": None}, {"a": {}}, epochs)
  assert (done, sum(epochs.values())) == (12.5, 30)
  assert lanes._num_epochs(lanes.Job("d", "demo", tmp_path, tmp_path)) == 10  # configs/demo.py
