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


def test_a_finished_run_is_reported_once(tmp_path, monkeypatch):
  """A re-run whose training is already at its last epoch: one full bar, not one per poll."""
  job = lanes.Job("a", "demo", tmp_path / "a", tmp_path, epochs=10)
  job.workdir.mkdir()
  (job.workdir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch": 10.0}) + "\n")
  (job.workdir / "result.json").write_text(json.dumps({"best_val_mean_auc": 0.8, "best_step": 4}))

  class Finishing:  # running for three polls, then exit status 0
    polls = 0

    def poll(self):
      self.polls += 1
      return 0 if self.polls > 3 else None

  monkeypatch.setattr(lanes, "_start", lambda job, core: Finishing())
  monkeypatch.setattr(lanes.time, "sleep", lambda s: None)
  calls = []
  lanes.run([job], cores=[0], say=lambda line: None, progress=lambda *a: calls.append(a))
  assert calls == [(lanes.STAGE, 10.0, 10)]
