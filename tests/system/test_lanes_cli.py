"""lsemil.workflows.lanes: the demo's trainings side by side, one CPU core each (real processes)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lsemil.core.errors import OutputError
from lsemil.training import trainer
from lsemil.workflows import lanes


def _cores_of_runs_in(folder: Path) -> dict[str, str]:
  """For each live `lsemil train` process whose --workdir lies under `folder`: its workdir
  name -> its allowed CPUs (/proc/PID/status), read from the kernel, not from our code."""
  found = {}
  for proc in Path("/proc").iterdir():
    if not proc.name.isdigit():
      continue
    try:
      argv = (proc / "cmdline").read_bytes().split(b"\0")
      status = (proc / "status").read_text()
    except OSError:
      continue
    args = [a.decode(errors="replace") for a in argv]
    if "train" in args and "--workdir" in args:
      workdir = Path(args[args.index("--workdir") + 1])
      if folder in workdir.parents:
        allowed = next(ln.split(":", 1)[1].strip() for ln in status.splitlines()
                       if ln.startswith("Cpus_allowed_list"))  # fmt: skip
        found[workdir.name] = allowed
  return found


def _run_watching(jobs, cores, folder: Path) -> tuple[dict, dict, list[str]]:
  lines, seen, out = [], {}, {}
  thread = threading.Thread(
    target=lambda: out.update(lanes.run(jobs, cores=cores, say=lines.append))
  )
  thread.start()
  while thread.is_alive():
    seen.update(_cores_of_runs_in(folder))
    time.sleep(0.2)
  thread.join()
  return out, seen, lines


def test_runs_are_pinned_one_core_each_and_lanes_do_not_change_the_numbers(tmp_path, synth_dir):
  cores = lanes.available_cores()
  two = cores[:2]
  jobs = [lanes.Job(f"j{i}", "smoke", tmp_path / "two" / f"j{i}", synth_dir) for i in (0, 1)]
  results, seen, lines = _run_watching(jobs, two, tmp_path / "two")
  assert sorted(results) == ["j0", "j1"]
  assert set(seen) == {"j0", "j1"}, f"did not see both runs' processes: {seen}"
  if len(two) == 2:  # both ran at once, each on its own single core
    assert sorted(seen.values()) == sorted(str(c) for c in two)
  else:
    assert set(seen.values()) == {str(two[0])}
  assert sum("on core" in line for line in lines) == 2
  assert all((j.workdir / "train.log").stat().st_size > 0 for j in jobs)

  one = lanes.Job("j0", "smoke", tmp_path / "one" / "j0", synth_dir)
  results1, seen1, _ = _run_watching([one], [two[-1]], tmp_path / "one")
  assert seen1 == {"j0": str(two[-1])}
  preds = [(w / trainer.VALIDATION_PREDICTIONS).read_bytes() for w in (*[j.workdir for j in jobs],
                                                                      one.workdir)]
  assert preds[0] == preds[1] == preds[2]  # one thread each: the same numbers on any core
  assert results["j0"]["best_val_mean_auc"] == results1["j0"]["best_val_mean_auc"]


def test_a_failing_run_is_one_error_naming_its_log(tmp_path, synth_dir):
  job = lanes.Job("bad", "smoke:bogus=1", tmp_path / "bad", synth_dir)
  with pytest.raises(OutputError) as e:
    lanes.run([job], cores=lanes.available_cores()[:1], say=lambda _: None)
  message = str(e.value)
  assert str(job.workdir / "train.log") in message and "exit status 1" in message
  assert "bogus" in message  # the run's own one-line error, from its log


_PARENT = """
import sys
from pathlib import Path
from lsemil.workflows import lanes
from lsemil.core.errors import Interrupted
job = lanes.Job("j", sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
try:
  lanes.run([job], cores=lanes.available_cores()[:1], progress_s=1e9)
except Interrupted as e:
  print("INTERRUPTED", e, flush=True)
  sys.exit(e.exit_code)
"""

_LONG_SMOKE = """
from lsemil.core import configuration


def get_config(arg=None):
  config = configuration.load_config("smoke", arg)
  config.train.num_steps = 300
  config.train.eval_every_steps = 300
  config.train.checkpoint_every_steps = 20
  return config
"""


def test_sigterm_stops_the_runs_after_a_checkpoint_and_the_same_call_resumes(tmp_path, synth_dir):
  import signal
  import subprocess
  import sys

  from lsemil.core.errors import EXIT_PREEMPTED

  config = tmp_path / "long_smoke.py"
  config.write_text(_LONG_SMOKE)
  w = tmp_path / "runs" / "w"
  parent = subprocess.Popen(
    [sys.executable, "-c", _PARENT, str(config), str(w), str(synth_dir)],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )  # fmt: skip
  deadline = time.monotonic() + 300
  ckpts = w / "checkpoints"
  while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
    assert parent.poll() is None, parent.communicate()[0][-3000:]
    assert time.monotonic() < deadline, "no checkpoint"
    time.sleep(0.2)
  parent.send_signal(signal.SIGTERM)
  out, _ = parent.communicate(timeout=300)
  assert parent.returncode == EXIT_PREEMPTED, out[-3000:]
  assert "INTERRUPTED" in out and "resume" in out
  assert _cores_of_runs_in(tmp_path / "runs") == {}  # the training stopped too
  log = (w / "train.log").read_text()
  saved = int(log.split("after saving step ")[1].split()[0])
  assert 20 <= saved < 300 and (ckpts / str(saved)).is_dir()

  job = lanes.Job("j", str(config), w, synth_dir)
  (result,) = lanes.run([job], cores=lanes.available_cores()[:1]).values()
  assert result["last_step"] == 300
  log = (w / "train.log").read_text()  # appended: both runs' output
  assert "stopped by SIGTERM" in log and f"resuming from {ckpts / str(saved)}" in log
