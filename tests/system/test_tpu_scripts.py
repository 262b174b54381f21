"""Tests of tpu_scripts/*.sh: dry-run output, the commands really run, errors, hygiene.

Every script runs with a fake `gcloud` first on PATH that logs its argv (one JSON list a
line) and exits 0, so no cloud is touched, and:
- with DRY_RUN=1 the fake must never be called (a script bypassing DRY_RUN fails), and the
  printed lines ("+ " and a shell-quoted command) must parse back with shlex;
- with DRY_RUN unset the fake must be called with exactly the printed commands, in order;
- the remote command train.sh sends is executed here, in a fake worker home, to prove it
  starts `lsemil train` with the intended arguments and LSEMIL_MULTIHOST=1, detached.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS_DIR = REPO_ROOT / "tpu_scripts"
SCRIPTS = ["create.sh", "setup.sh", "stage_data.sh", "train.sh", "reproduce.sh", "delete.sh"]

# Settings the scripts read; removed from the inherited environment so tests are hermetic.
SETTINGS = [
  "PROJECT",
  "ZONE",
  "TPU_NAME",
  "ACCELERATOR_TYPE",
  "RUNTIME_VERSION",
  "BUCKET",
  "CONFIG",
  "STAMP",
  "RUN_NAME",
  "WORKDIR",
  "DATASET_NAME",
  "DATA_DIR",
  "REMOTE_REPO",
  "REMOTE_VENV",
  "REMOTE_LOG_DIR",
  "DRY_RUN",
  "SPOT",
  "RESERVED",
  "QUEUED",
  "QUEUED_RESOURCE_ID",
  "VALID_UNTIL",
  "CREATE_FLAGS",
  "QUIET",
  "REPO_URL",
  "REPO_REF",
  "SHIP_PATHS",
  "PYTHON_VERSION",
  "PIP_EXTRA",
  "DATA_SRC",
  "STAGE_TO",
  "WORKER_DATA_DIR",
  "TRAIN_ARGS",
  "R0_VALUES",
  "PAPER_CONFIG",
  "RUNS",
  "OUT",
  "REPRODUCE_ARGS",
  "REPRODUCE_WORKER",
  "DETACH",
  "LSEMIL_MULTIHOST",
  "DTYPE",
  "PREFLIGHT",
  "AOT_TOPOLOGY",
  "AOT_ARGS",
]

BASE = {"PROJECT": "my-project", "BUCKET": "my-bucket", "STAMP": "exp1"}

LOGGER = """#!{python}
import json, os, sys
with open(os.environ[{var!r}], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


def _write_exe(path: Path, text: str) -> None:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake(tmp_path):
  """A bin folder with a logging `gcloud`, and the file it logs to."""
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud_calls.jsonl"
  _write_exe(bin_dir / "gcloud", LOGGER.format(python=sys.executable, var="FAKE_GCLOUD_LOG"))
  data = tmp_path / "prepared" / "nih-512"
  data.mkdir(parents=True)
  (data / "train.csv").write_text("x\n")
  return {"bin": bin_dir, "log": log, "data": data, "tmp": tmp_path}


def _env(fake, overrides):
  env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  env["PATH"] = f"{fake['bin']}{os.pathsep}{env.get('PATH', '')}"
  env["FAKE_GCLOUD_LOG"] = str(fake["log"])
  env.update(overrides)
  return env


def _calls(fake):
  if not fake["log"].exists():
    return []
  return [json.loads(line) for line in fake["log"].read_text().splitlines()]


def run_script(fake, script, env, *, dry_run):
  """Runs a script; returns (process, printed commands, argv lists the fake gcloud got)."""
  fake["log"].unlink(missing_ok=True)
  env = dict(env)
  if dry_run:
    env["DRY_RUN"] = "1"
  proc = subprocess.run(
    ["bash", str(SCRIPTS_DIR / script)],
    env=_env(fake, env),
    capture_output=True,
    text=True,
    timeout=30,
    cwd=fake["tmp"],
  )
  printed = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
  return proc, printed, _calls(fake)


# (id, script, settings): one scenario per mode of each script.
SCENARIOS = [
  ("create", "create.sh", {}),
  (
    "create-queued-spot",
    "create.sh",
    {"QUEUED": "1", "SPOT": "1", "VALID_UNTIL": "6h", "ACCELERATOR_TYPE": "v5litepod-16"},
  ),
  ("setup-scp", "setup.sh", {}),
  ("setup-git", "setup.sh", {"REPO_URL": "https://github.com/example/lsemil.git"}),
  ("stage-bucket", "stage_data.sh", {"DATA_SRC": "@data"}),
  ("stage-workers-local", "stage_data.sh", {"DATA_SRC": "@data", "STAGE_TO": "workers"}),
  (
    "stage-workers-gcs",
    "stage_data.sh",
    {"DATA_SRC": "gs://my-bucket/lsemil/data/nih-512", "STAGE_TO": "workers"},
  ),
  ("train", "train.sh", {"TRAIN_ARGS": "--config.train.batch_size=64"}),
  ("reproduce", "reproduce.sh", {}),
  ("reproduce-w0", "reproduce.sh", {"REPRODUCE_WORKER": "0", "DETACH": "0"}),
  ("delete", "delete.sh", {}),
  ("delete-queued", "delete.sh", {"QUEUED": "1", "QUIET": "1"}),
]


def _settings(fake, extra):
  env = {**BASE, **extra}
  return {k: (str(fake["data"]) if v == "@data" else v) for k, v in env.items()}


def _flag(argv, name):
  """The value of --name=V or --name V in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _is_tpu_vm(argv, verb):
  return argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and argv[4] == verb


@pytest.mark.parametrize("script,extra", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_dry_run_prints_exactly_what_runs(fake, script, extra):
  env = _settings(fake, extra)
  proc, printed, calls = run_script(fake, script, env, dry_run=True)
  assert proc.returncode == 0, proc.stderr
  assert printed, "dry run printed no command"
  assert calls == [], "DRY_RUN=1 but gcloud was called"
  for argv in printed:
    assert argv[0] == "gcloud"
    # GA surface only: no `gcloud alpha|beta`.
    assert argv[1] in ("compute", "storage"), argv
  for argv in printed:
    if _is_tpu_vm(argv, "ssh"):  # what each worker's shell will parse must be valid bash
      check = subprocess.run(["bash", "-n", "-c", _flag(argv, "command")], capture_output=True)
      assert check.returncode == 0, check.stderr
  proc, printed_real, calls = run_script(fake, script, env, dry_run=False)
  assert proc.returncode == 0, proc.stderr
  assert printed_real == [], "printed commands without DRY_RUN"
  assert calls == printed


@pytest.mark.parametrize(
  "script,extra",
  [
    s[1:]
    for s in SCENARIOS
    if s[0] not in ("reproduce-w0",)
    and s[1] in ("setup.sh", "stage_data.sh", "train.sh", "reproduce.sh")
  ],
)
def test_every_host_acts(fake, script, extra):
  _, printed, _ = run_script(fake, script, _settings(fake, extra), dry_run=True)
  tpu_calls = [a for a in printed if _is_tpu_vm(a, "ssh") or _is_tpu_vm(a, "scp")]
  if extra.get("STAGE_TO") != "workers" and script == "stage_data.sh":
    assert tpu_calls == []  # bucket staging needs no worker
    return
  assert tpu_calls
  for argv in tpu_calls:
    assert "--worker=all" in argv, argv


def _remote_job(ssh_argv):
  """The job inside a remote_detached command: the argument of `bash -c`."""
  words = shlex.split(_flag(ssh_argv, "command"))
  assert "setsid" in words and "nohup" in words
  i = words.index("bash")
  assert words[i + 1] == "-c"
  # Detached: stdin from /dev/null, stdout and stderr appended to a log, backgrounded.
  rest = words[i + 3 :]
  assert rest[:5] == [">>", rest[1], "2>&1", "<", "/dev/null"] and rest[5] == "&", rest
  return words[i + 2], rest[1]


def _shell_words(text):
  """Words of a shell command line, with ; && | > < & as words of their own."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _lsemil_argv(job, sub):
  words = _shell_words(job)
  i = words.index("lsemil")
  assert words[i + 1] == sub
  end = next((j for j in range(i, len(words)) if words[j] in (";", "&&")), len(words))
  return words[i + 1 : end]


def test_train_one_ssh_carries_config_and_workdir(fake):
  env = _settings(
    fake, {"CONFIG": "configs/paper.py:r0=10", "TRAIN_ARGS": "--config.train.batch_size=64"}
  )
  _, printed, _ = run_script(fake, "train.sh", env, dry_run=True)
  assert len(printed) == 1 and _is_tpu_vm(printed[0], "ssh")
  ssh = printed[0]
  assert "--worker=all" in ssh and _flag(ssh, "project") == "my-project"
  command = _flag(ssh, "command")
  assert "$(date" not in command and "`" not in command  # the stamp is resolved locally
  job, log = _remote_job(ssh)
  assert "export LSEMIL_MULTIHOST=1" in job
  argv = _lsemil_argv(job, "train")
  assert argv == [
    "train",
    "--config",
    "configs/paper.py:r0=10",
    "--workdir",
    "gs://my-bucket/lsemil/paper-r0-10-exp1",
    "--data-dir",
    "~/lsemil-data/nih-512",  # the worker's local copy; the worker's shell expands ~/
    "--config.model.dtype=bfloat16",  # DTYPE: TPU runs compute in bf16, params float32
    "--config.train.batch_size=64",
  ]
  assert " --data-dir ~/lsemil-data/nih-512" in job  # the tilde is left unquoted
  assert log == "~/lsemil-logs/train-paper-r0-10-exp1.log"


def _fake_lsemil(fake, rc: int) -> None:
  """An `lsemil` on the fake PATH that logs its argv beside gcloud's and exits `rc`."""
  text = LOGGER.format(python=sys.executable, var="FAKE_GCLOUD_LOG") + f"sys.exit({rc})\n"
  _write_exe(fake["bin"] / "lsemil", text)


PREFLIGHT = {
  "PREFLIGHT": "1",
  "ACCELERATOR_TYPE": "v5litepod-16",
  "AOT_ARGS": "--per-chip-batch 32",
}
AOT_ARGV = ["lsemil", "aot", "--config", "configs/paper.py:r0=5", "--dtype", "bfloat16",
            "--topology", "v5e:4x4", "--per-chip-batch", "32"]  # fmt: skip


def test_preflight_compiles_before_renting(fake):
  _fake_lsemil(fake, 0)
  proc, _, calls = run_script(fake, "create.sh", _settings(fake, PREFLIGHT), dry_run=False)
  assert proc.returncode == 0, proc.stderr
  assert calls[0] == AOT_ARGV and _is_tpu_vm(calls[1], "create") and len(calls) == 2
  proc, printed, calls = run_script(fake, "create.sh", _settings(fake, PREFLIGHT), dry_run=True)
  assert proc.returncode == 0 and calls == [] and printed[0] == AOT_ARGV


def test_preflight_stops_when_it_does_not_fit(fake):
  _fake_lsemil(fake, 1)
  proc, _, calls = run_script(fake, "create.sh", _settings(fake, PREFLIGHT), dry_run=False)
  assert proc.returncode != 0 and calls == [AOT_ARGV]  # nothing rented
  assert (
    "does not fit on v5litepod-16 (v5e:4x4" in proc.stderr and "nothing was created" in proc.stderr
  )
  env = _settings(fake, {**PREFLIGHT, "ACCELERATOR_TYPE": "v5litepod-3"})
  proc, _, calls = run_script(fake, "create.sh", env, dry_run=False)
  assert proc.returncode != 0 and "AOT_TOPOLOGY" in proc.stderr and calls == []


@pytest.mark.parametrize(
  "accel,topology",
  [("v5litepod-16", "v5e:4x4"), ("v6e-8", "v6e:2x4"), ("v4-32", "v4:2x2x4"),
   ("v5p-8", "v5p:2x2x1"), ("v4-8", "v4:2x2x1"), ("v3-8", "")],
)  # fmt: skip
def test_aot_topology_of_accelerator_type(accel, topology):
  proc = subprocess.run(
    ["bash", "-c", 'source "$0"; aot_topology "$1"', str(SCRIPTS_DIR / "common.sh"), accel],
    capture_output=True, text=True, timeout=10, env={**os.environ, "DRY_RUN": "0"},
  )  # fmt: skip
  assert proc.returncode == 0 and proc.stdout.strip() == topology, proc.stderr


def test_train_requires_gcs_workdir(fake):
  env = _settings(fake, {"WORKDIR": "/tmp/run"})
  proc, printed, calls = run_script(fake, "train.sh", env, dry_run=True)
  assert proc.returncode != 0 and "WORKDIR" in proc.stderr
  assert printed == [] and calls == []


def test_reproduce_finds_the_train_workdirs(fake):
  train_workdirs = {}
  for r0 in ("0", "5", "10"):
    _, printed, _ = run_script(
      fake, "train.sh", _settings(fake, {"CONFIG": f"configs/paper.py:r0={r0}"}), dry_run=True
    )
    argv = _lsemil_argv(_remote_job(printed[0])[0], "train")
    train_workdirs[r0] = argv[argv.index("--workdir") + 1]
  _, printed, _ = run_script(fake, "reproduce.sh", _settings(fake, {}), dry_run=True)
  assert len(printed) == 1 and "--worker=all" in printed[0]
  job, _ = _remote_job(printed[0])
  assert "export LSEMIL_MULTIHOST=1" in job
  argv = _lsemil_argv(job, "reproduce")
  runs = [argv[i + 1] for i, a in enumerate(argv) if a == "--run"]
  assert runs == [f"r0={r0}:{w}" for r0, w in train_workdirs.items()]
  assert argv[argv.index("--out") + 1] == "gs://my-bucket/lsemil/reproduce-exp1"
  assert argv[argv.index("--data-dir") + 1] == "~/lsemil-data/nih-512"
  assert " --data-dir ~/lsemil-data/nih-512 " in job


def test_staged_worker_copy_is_the_default_data_dir(fake):
  """stage_data.sh STAGE_TO=workers writes where train.sh reads, and says so."""
  env = _settings(fake, {"DATA_SRC": "gs://my-bucket/lsemil/data/nih-512", "STAGE_TO": "workers"})
  proc, printed, _ = run_script(fake, "stage_data.sh", env, dry_run=True)
  assert proc.returncode == 0, proc.stderr
  (ssh,) = printed
  words = _shell_words(_flag(ssh, "command"))
  assert words[-1] == "~/lsemil-data/nih-512" and "gs://my-bucket/lsemil/data/nih-512" in words
  assert "DATA_DIR=~/lsemil-data/nih-512" in proc.stderr
  # Bucket staging points at the next step: onto the workers.
  proc, _, _ = run_script(
    fake, "stage_data.sh", _settings(fake, {"DATA_SRC": "@data"}), dry_run=True
  )
  assert proc.returncode == 0, proc.stderr
  assert "STAGE_TO=workers DATA_SRC=gs://my-bucket/lsemil/data/nih-512" in proc.stderr


REMOTE_DATA = [
  ("train.sh", "DATA_DIR", {"DATA_DIR": "gs://my-bucket/lsemil/data/nih-512"}),
  ("reproduce.sh", "DATA_DIR", {"DATA_DIR": "s3://b/nih-512"}),
  (
    "stage_data.sh",
    "WORKER_DATA_DIR",
    {"DATA_SRC": "@data", "STAGE_TO": "workers", "WORKER_DATA_DIR": "gs://b/x"},
  ),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry", "real"])
@pytest.mark.parametrize("script,var,extra", REMOTE_DATA, ids=[s for s, _, _ in REMOTE_DATA])
def test_remote_data_dir_is_refused(fake, script, var, extra, dry_run):
  proc, printed, calls = run_script(fake, script, _settings(fake, extra), dry_run=dry_run)
  assert proc.returncode != 0
  assert f"{var}=" in proc.stderr and "local disk" in proc.stderr, proc.stderr
  assert "STAGE_TO=workers" in proc.stderr
  assert printed == [] and calls == []


def test_setup_installs_jax_tpu_and_lsemil_everywhere(fake):
  _, printed, _ = run_script(fake, "setup.sh", _settings(fake, {}), dry_run=True)
  scp = [a for a in printed if _is_tpu_vm(a, "scp")]
  assert len(scp) == 1 and "--recurse" in scp[0] and "--worker=all" in scp[0]
  assert str(REPO_ROOT / "lsemil") in scp[0] and "lsemil-tpu:lsemil/" in scp[0]
  install = shlex.split(_flag(printed[-1], "command"))
  text = " ".join(install)
  assert "pip install -U jax[tpu]" in text and "pip install -e ~/lsemil" in text
  assert "libtpu" not in text and " -f " not in f" {text} "


@pytest.mark.parametrize(
  "accel,version",
  [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_runtime_version_follows_generation(fake, accel, version):
  _, printed, _ = run_script(
    fake, "create.sh", _settings(fake, {"ACCELERATOR_TYPE": accel}), dry_run=True
  )
  assert printed[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert _flag(printed[0], "accelerator-type") == accel
  assert _flag(printed[0], "version") == version
  _, printed, _ = run_script(
    fake,
    "create.sh",
    _settings(fake, {"ACCELERATOR_TYPE": accel, "RUNTIME_VERSION": "rv-x"}),
    dry_run=True,
  )
  assert _flag(printed[0], "version") == "rv-x"


MISSING = [
  ("create.sh", "PROJECT", {}),
  ("setup.sh", "PROJECT", {}),
  ("delete.sh", "PROJECT", {}),
  ("train.sh", "PROJECT", {}),
  ("train.sh", "BUCKET", {}),
  ("reproduce.sh", "BUCKET", {}),
  ("reproduce.sh", "STAMP", {}),
  ("stage_data.sh", "DATA_SRC", {}),
  ("stage_data.sh", "BUCKET", {"DATA_SRC": "@data"}),
  ("stage_data.sh", "PROJECT", {"DATA_SRC": "@data", "STAGE_TO": "workers"}),
  ("create.sh", "RUNTIME_VERSION", {"ACCELERATOR_TYPE": "v3-8"}),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry", "real"])
@pytest.mark.parametrize("script,var,extra", MISSING, ids=[f"{s}-{v}" for s, v, _ in MISSING])
def test_missing_setting_is_a_clear_error(fake, script, var, extra, dry_run):
  env = _settings(fake, extra)
  env.pop(var, None)
  proc, printed, calls = run_script(fake, script, env, dry_run=dry_run)
  assert proc.returncode != 0
  assert var in proc.stderr, proc.stderr
  assert printed == [] and calls == []


def test_bad_dry_run_value_and_credentials_in_repo_url_are_refused(fake):
  proc, _, calls = run_script(fake, "create.sh", _settings(fake, {"DRY_RUN": "yes"}), dry_run=False)
  assert proc.returncode != 0 and "DRY_RUN" in proc.stderr and calls == []
  env = _settings(fake, {"REPO_URL": "https://user:abc123@github.com/x/lsemil.git"})
  proc, _, calls = run_script(fake, "setup.sh", env, dry_run=True)
  assert proc.returncode != 0 and "REPO_URL" in proc.stderr and calls == []


CREDENTIAL_PATTERNS = [
  r"private_key",
  r"BEGIN [A-Z ]*(PRIVATE|KEY)",
  r"token=",
  r"AIza[0-9A-Za-z_-]{10,}",
  r"ya29\.",
  r"gh[pousr]_[0-9A-Za-z]{20,}",
  r"password",
  r"passwd",
  r"secret",
  r"client_secret",
  r"access_key",
  r"://[^/\s:@]+:[^/\s@]+@",
  r"GOOGLE_APPLICATION_CREDENTIALS",
]


def test_no_credentials_in_scripts_or_commands(fake):
  texts = {p.name: p.read_text() for p in SCRIPTS_DIR.iterdir() if p.is_file()}
  for _, script, extra in SCENARIOS:
    proc, _, _ = run_script(fake, script, _settings(fake, extra), dry_run=True)
    texts[f"dry-run of {script} {extra}"] = proc.stdout + proc.stderr
  for name, text in texts.items():
    for pattern in CREDENTIAL_PATTERNS:
      assert not re.search(pattern, text, re.IGNORECASE), f"{pattern!r} in {name}"


QUOTE_CASES = ["", "plain", "a b", "it's", "$HOME", "`x`", '"q"', "a\\b", "*?[x]", "~/x", "-n", "é"]


def test_quote_round_trips_through_shlex():
  """common.sh `quote` output parses back, in Python's shlex, to the very same word."""
  proc = subprocess.run(
    [
      "bash",
      "-c",
      'source "$0"; for a in "$@"; do quote "$a"; echo; done',
      str(SCRIPTS_DIR / "common.sh"),
      *QUOTE_CASES,
    ],
    capture_output=True,
    text=True,
    timeout=10,
    env={**os.environ, "DRY_RUN": "0"},
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.split("\n")[: len(QUOTE_CASES)]
  assert [shlex.split(line) for line in lines] == [[c] for c in QUOTE_CASES]


def test_scripts_are_strict_bash():
  for name in SCRIPTS:
    path = SCRIPTS_DIR / name
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), name
    assert "\nset -euo pipefail\n" in text, name
    assert os.access(path, os.X_OK), f"{name} is not executable"
    assert "gcloud alpha" not in text and "gcloud beta" not in text, name
    assert "libtpu_releases" not in text, name
  assert "run()" in (SCRIPTS_DIR / "common.sh").read_text()


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
  files = [str(SCRIPTS_DIR / n) for n in [*SCRIPTS, "common.sh"]]
  proc = subprocess.run(
    [shellcheck, "-x", *files], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


FAKE_LSEMIL = """#!{python}
import json, os, sys, time
release = os.environ["FAKE_RELEASE"]
with open(os.environ["FAKE_LSEMIL_OUT"], "w") as f:
  json.dump({{"argv": sys.argv[1:], "multihost": os.environ.get("LSEMIL_MULTIHOST"),
             "sid": os.getsid(0), "cwd": os.getcwd()}}, f)
print("lsemil fake running", flush=True)
deadline = time.time() + 20
while not os.path.exists(release) and time.time() < deadline:
  time.sleep(0.02)
sys.exit(3)
"""


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_train_remote_command_runs_detached_on_a_worker(fake):
  """Executes the --command train.sh sends, as a worker's shell would, in a fake home."""
  workdir = "gs://my-bucket/lsemil/it's a $run"  # quoting must survive two shell levels
  env = _settings(fake, {"WORKDIR": workdir})
  _, printed, _ = run_script(fake, "train.sh", env, dry_run=True)
  command = _flag(printed[0], "command")

  home = fake["tmp"] / "home"
  venv_bin = home / "lsemil-venv" / "bin"
  venv_bin.mkdir(parents=True)
  (home / "lsemil").mkdir()
  (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
  _write_exe(venv_bin / "lsemil", FAKE_LSEMIL.format(python=sys.executable))
  out, release = fake["tmp"] / "lsemil_run.json", fake["tmp"] / "release"
  worker_env = _env(
    fake, {"HOME": str(home), "FAKE_LSEMIL_OUT": str(out), "FAKE_RELEASE": str(release)}
  )
  # ssh returns only once every holder of its stdout/stderr exits: with the job attached,
  # this would block until the fake lsemil is released, i.e. time out.
  proc = subprocess.run(
    ["bash", "-c", command], env=worker_env, capture_output=True, text=True, timeout=10, cwd=home
  )
  assert proc.returncode == 0, proc.stderr
  assert "started train-" in proc.stdout
  deadline = time.time() + 60  # generous: a loaded machine starts Python slowly
  got = None
  while got is None and time.time() < deadline:
    try:
      got = json.loads(out.read_text())  # written by the detached job; may be half there
    except (OSError, ValueError):
      time.sleep(0.05)
  assert got is not None, f"the detached job wrote no complete {out}"
  release.touch()
  assert got["argv"] == [
    "train",
    "--config",
    "configs/paper.py:r0=5",
    "--workdir",
    workdir,
    "--data-dir",
    str(home / "lsemil-data" / "nih-512"),  # ~/ expanded by the worker's shell
    "--config.model.dtype=bfloat16",
  ]
  assert got["multihost"] == "1"
  assert got["sid"] != os.getsid(0)  # its own session: no SIGHUP when ssh goes
  assert got["cwd"] == str(home / "lsemil")
  # When the run ends, the log (with lsemil's output) is copied next to the checkpoints.
  logs = list((home / "lsemil-logs").glob("train-*.log"))
  assert len(logs) == 1
  deadline = time.time() + 10
  while not _calls(fake) and time.time() < deadline:
    time.sleep(0.02)
  (cp,) = _calls(fake)
  assert cp[:3] == ["gcloud", "storage", "cp"] and cp[3] == str(logs[0])
  assert cp[4] == f"{workdir}/logs/{os.uname().nodename}.log"
  assert "lsemil fake running" in logs[0].read_text()
