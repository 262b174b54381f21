"""Tests of lsemil.training.metric_writer: metrics.jsonl and TensorBoard events (its fault
tests, resume and a full disk, are in tests/system/test_faults.py)."""

from __future__ import annotations

import json

import numpy as np


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  from lsemil.training import metric_writer

  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 2.0}\n')
  w = metric_writer.MetricWriter(tmp_path)
  w.write(
    2, {"loss": np.float32(1.5), "aucs": [0.5, float("nan")], "auc": float("nan")}, kind="train"
  )
  w.flush()
  w.close()
  w.close()  # idempotent
  lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines[0]["step"] == 1  # appended, not overwritten (resume)
  assert lines[1] == {"step": 2, "kind": "train", "loss": 1.5, "aucs": [0.5, None], "auc": None}
  events = list((tmp_path / "tb").glob("events.out.tfevents*"))
  assert events and events[0].stat().st_size > 0
  metric_writer.MetricWriter(tmp_path / "off", enabled=False).write(1, {"x": 1}, kind="train")
  assert not (tmp_path / "off").exists()  # only process 0 writes
