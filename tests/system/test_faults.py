"""Faults that must lose nothing, each tried for real.

- images that must not crash anything: a zero-byte PNG, a symlink loop, a 300-character
  image id, a 20000x20000 PNG, a 3x3 image and a JPEG named .png, through `lsemil prepare
  --on-bad skip|error`, `lsemil stats` and `lsemil synth`;
- `prepare` and `synth` SIGKILLed at several moments: the rerun's images equal a clean run's;
- metrics.jsonl: one line per step and kind on resume; a full disk never leaves a torn line;
- checkpoints: partial step folders are never restored from and are removed; a full disk
  (a real 8 MB tmpfs, where mounting is allowed) gives one error line and keeps the earlier
  checkpoints; SIGKILL during an asynchronous save resumes from the last complete one;
- the workdir lock: a second `lsemil train` on a workdir refuses at once naming the holder; a
  killed holder leaves no stale lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from lsemil.core.errors import EXIT_PREEMPTED, OutputError, WorkdirBusyError
from lsemil.data import imageio, nih
from lsemil.runtime import checkpointing
from lsemil.training import metric_writer, workdir_lock

REPO = Path(__file__).resolve().parents[2]


def _popen(lsemil, *args, cache=None) -> subprocess.Popen:
  # its own process group: workers die with it
  return lsemil.popen(*args, cache=cache, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)


def _wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 240.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    if proc is not None and proc.poll() is not None:
      return False
    time.sleep(0.005)
  raise AssertionError("timed out waiting")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("jax_cache")


# --------------------------------------------------------------------------- bad images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  crc = zlib.crc32(kind + data) & 0xFFFFFFFF
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def huge_png(path: Path, side: int = 20000) -> None:
  """A valid 8-bit grey PNG of side x side black pixels (about 400 KB), written without
  ever holding the pixels in memory."""
  comp, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
  for _ in range(side):
    parts.append(comp.compress(row))
  parts.append(comp.flush())
  ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
  data = imageio.PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr)
  path.write_bytes(data + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


LONG_ID = "99999999_" + "0" * 287 + ".png"  # 300 characters, patient 99999999

# fault -> (what is done to image k of the folder, the reason prepare must give)
FAULTS = {
  "zero_byte": "empty file (0 bytes)",
  "symlink_loop": "cannot read (Too many levels of symbolic links)",
  "huge": "20000x20000 pixels, above the limit of 40,000,000",
  "tiny": "3x3 pixels, smaller than 32 px a side",
  "jpeg_named_png": "named .png but not a PNG file (content: JPEG)",
  "long_id": "image id longer than 255 bytes, which no file name can be",
}


def _plant(root: Path, fault: str, k: int) -> str:
  """Plants `fault` on the k-th image of an NIH folder; returns the image id it hits."""
  images = sorted((root / "images").glob("*.png"))
  path = images[k]
  if fault == "zero_byte":
    path.write_bytes(b"")
  elif fault == "symlink_loop":
    path.unlink()
    os.symlink(path.name, path)  # itself: ELOOP
    os.symlink("../images", root / "images" / "loop_dir")  # and a folder loop, ignored
  elif fault == "huge":
    huge_png(path)
  elif fault == "tiny":
    cv2.imwrite(str(path), np.full((3, 3), 128, np.uint8))
  elif fault == "jpeg_named_png":
    ok, jpg = cv2.imencode(".jpg", cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    path.write_bytes(jpg.tobytes())
  elif fault == "long_id":
    csv = root / "Data_Entry_2017_v2020.csv"
    lines = csv.read_text().splitlines()
    fields = lines[1].split(",")
    fields[0], fields[3] = LONG_ID, "99999999"
    csv.write_text("\n".join([*lines, ",".join(fields)]) + "\n")
    tv = root / "train_val_list.txt"
    tv.write_text(tv.read_text().rstrip("\n") + "\n" + LONG_ID + "\n")
    return LONG_ID
  return path.name


@pytest.fixture(scope="module")
def small_nih(tmp_path_factory) -> Path:
  from lsemil.data.phantoms import synthesize

  return synthesize(
    tmp_path_factory.mktemp("small") / "nih", patients=4, size=512, seed=0, workers=1,
    progress=False,
  )


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
  out = proc.stdout + proc.stderr
  assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_bad_image_is_named_and_skipped_or_refused(tmp_path, small_nih, fault, lsemil):
  raw = tmp_path / "raw"
  shutil.copytree(small_nih, raw, symlinks=True)
  bad_id = _plant(raw, fault, 1)
  total = len(nih.load_index(raw))

  refused = lsemil.run("prepare", "--nih-dir", raw, "--out", tmp_path / "err", "--size", 64,
                 "--on-bad", "error", "--workers", 1, timeout=120)
  _no_traceback(refused)
  assert refused.returncode == 1
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith("lsemil prepare: ") and FAULTS[fault] in last
  assert nih.short_id(bad_id) in last and "--on-bad skip" in last
  assert not (tmp_path / "err" / nih.MARKER_NAME).exists()  # nothing claims to be done

  skipped = lsemil.run("prepare", "--nih-dir", raw, "--out", tmp_path / "skip", "--size", 64,
                 "--on-bad", "skip", "--workers", 1, timeout=120)
  _no_traceback(skipped)
  assert skipped.returncode == 0, skipped.stderr[-2000:]
  assert "1 bad images skipped" in skipped.stderr and FAULTS[fault] in skipped.stderr
  bad = (tmp_path / "skip" / "bad_files.txt").read_text().splitlines()
  assert [line.split("\t")[0] for line in bad] == [bad_id]
  prepared = nih.load_index(tmp_path / "skip")
  assert bad_id not in prepared.image_ids
  assert all(p is not None for p in prepared.image_paths)
  assert len(prepared) == total - 1

  stats = lsemil.run("stats", "--nih-dir", raw, timeout=120)
  _no_traceback(stats)
  assert stats.returncode == 0 and "Atelectasis" in stats.stdout
  if fault == "long_id":
    assert "1 image ids are longer than 255 bytes" in stats.stderr


def test_all_bad_images_at_once_are_counted(tmp_path, small_nih, lsemil):
  raw = tmp_path / "raw"
  shutil.copytree(small_nih, raw)
  ids = [_plant(raw, fault, k) for k, fault in enumerate(FAULTS)]
  proc = lsemil.run("prepare", "--nih-dir", raw, "--out", tmp_path / "out", "--size", 64,
              "--on-bad", "skip", "--workers", 2, timeout=120)
  _no_traceback(proc)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"{len(FAULTS)} bad images skipped" in proc.stderr
  bad = dict(line.split("\t") for line in (tmp_path / "out" / "bad_files.txt").read_text()
             .splitlines())
  assert sorted(bad) == sorted(ids)
  for fault, image_id in zip(FAULTS, ids, strict=True):
    assert FAULTS[fault] in bad[image_id]


def test_image_limits_are_read_from_the_header_before_decoding(tmp_path):
  """A 20000x20000 PNG is refused from its IHDR: far less memory than its 400 MB of pixels."""
  path = tmp_path / "huge.png"
  huge_png(path)
  assert path.stat().st_size < 600_000
  code = textwrap.dedent(f"""
    import resource
    from lsemil.core.errors import ImageError
    from lsemil.data import imageio
    print("BEFORE_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    try:
      imageio.read_gray({str(path)!r})
    except ImageError as e:
      print("REFUSED", e)
    print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120).stdout
  assert "REFUSED" in out and "20000x20000 pixels" in out
  grew_kb = int(out.split("MAXRSS_KB")[1]) - int(out.split("BEFORE_KB")[1].split()[0])
  assert grew_kb < 50_000  # the decoded image alone would be 400 MB


def test_synth_rerun_redoes_damaged_images(tmp_path, small_nih, lsemil):
  """`lsemil synth` into a folder whose images were emptied, truncated, shrunk or made a
  symlink loop rewrites exactly those, identical to a clean run."""
  out = tmp_path / "nih"
  shutil.copytree(small_nih, out)
  images = sorted((out / "images").glob("*.png"))
  images[0].write_bytes(b"")
  images[1].write_bytes(images[1].read_bytes()[:-100])
  cv2.imwrite(str(images[2]), np.zeros((3, 3), np.uint8))
  images[3].unlink()
  os.symlink(images[3].name, images[3])
  proc = lsemil.run("synth", "--out", out, "--patients", 4, "--size", 512, "--workers", 1)
  _no_traceback(proc)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for path in sorted((small_nih / "images").glob("*.png")):
    assert (out / "images" / path.name).read_bytes() == path.read_bytes(), path.name


# --------------------------------------------------------------------------- killed mid-run


def _count_pngs(folder: Path) -> int:
  try:
    return sum(1 for p in folder.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
  except FileNotFoundError:
    return 0


def _same_images(a: Path, b: Path) -> None:
  names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
  assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
  assert not [p for p in b.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name]
  for name in names:
    np.testing.assert_array_equal(
      imageio.read_gray(a / name), imageio.read_gray(b / name), err_msg=name
    )


def _kill_at_thirds(lsemil, out: Path, n: int, *args) -> list[int]:
  """`lsemil *args --out out --workers 2` (which writes n images to out/images) started three
  times, SIGKILLed once 1, n/3 and 2n/3 images are there (unless it ends first): the image
  counts at the kills."""
  kills = []
  for at in (1, n // 3, 2 * n // 3):
    proc = _popen(lsemil, *args, "--out", out, "--workers", 2)
    if _wait_for(lambda at=at: _count_pngs(out / "images") >= at, proc):
      _kill_group(proc)
      kills.append(_count_pngs(out / "images"))
    else:
      proc.wait()
  return kills


def test_prepare_killed_at_several_moments_then_rerun_equals_clean_run(tmp_path, lsemil):
  from lsemil.data.phantoms import synthesize

  raw = synthesize(tmp_path / "raw", patients=24, size=1024, seed=1, workers=2, progress=False)
  n = len(nih.load_index(raw))
  args = ["--nih-dir", raw, "--size", 256, "--on-bad", "error"]
  clean = lsemil.run("prepare", *args, "--out", tmp_path / "clean", "--workers", 1)
  assert clean.returncode == 0, clean.stderr[-2000:]
  out = tmp_path / "out"
  kills = _kill_at_thirds(lsemil, out, n, "prepare", *args)
  assert kills and max(kills) < n  # really killed mid-run
  print(f"prepare SIGKILLed with {kills} of {n} images written")
  assert not (out / nih.MARKER_NAME).exists()
  rerun = lsemil.run("prepare", *args, "--out", out, "--workers", 2)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert f"{max(kills)} already done" in rerun.stderr or "already done" in rerun.stderr
  _same_images(tmp_path / "clean" / "images", out / "images")
  for name in ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "BBox_List_2017.csv"):
    assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_synth_killed_at_several_moments_then_rerun_equals_clean_run(tmp_path, lsemil):
  args = ["--patients", 30, "--size", 512, "--seed", 3]
  clean = lsemil.run("synth", *args, "--out", tmp_path / "clean", "--workers", 1)
  assert clean.returncode == 0, clean.stderr[-2000:]
  n = _count_pngs(tmp_path / "clean" / "images")
  out = tmp_path / "out"
  kills = _kill_at_thirds(lsemil, out, n, "synth", *args)
  assert kills and max(kills) < n
  print(f"synth SIGKILLed with {kills} of {n} images written")
  rerun = lsemil.run("synth", *args, "--out", out, "--workers", 2)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  _same_images(tmp_path / "clean" / "images", out / "images")
  for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", nih.MARKER_NAME):
    assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


# --------------------------------------------------------------------------- metrics.jsonl


def _events(path: Path) -> list:
  """The Event protos of a TensorBoard event file, each record's CRCs checked."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

  data, pos, out = path.read_bytes(), 0, []
  while pos < len(data):
    (n,) = struct.unpack("Q", data[pos : pos + 8])
    assert struct.unpack("I", data[pos + 8 : pos + 12])[0] == masked_crc32c(data[pos : pos + 8])
    body = data[pos + 12 : pos + 12 + n]
    assert struct.unpack("I", data[pos + 12 + n : pos + 16 + n])[0] == masked_crc32c(body)
    out.append(event_pb2.Event.FromString(body))
    pos += 16 + n
  return out


def test_metric_writer_resume_keeps_one_line_per_step_and_kind(tmp_path):
  lines = [{"step": s, "kind": "train", "loss": float(s)} for s in range(1, 6)]
  lines += [{"step": 2, "kind": "eval", "auc": 0.5}, {"step": 4, "kind": "eval", "auc": 0.6}]
  lines.append({"step": 2, "kind": "train", "loss": 22.0})  # a duplicate of an older version
  text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "kind": "tr'  # torn
  (tmp_path / "metrics.jsonl").write_text(text)
  w = metric_writer.MetricWriter(tmp_path, resume_step=3)  # the last checkpoint was step 3
  assert w.dropped == 5  # steps 4, 5, eval 4, the torn line, the older step-2 duplicate
  w.write(4, {"loss": 4.5}, kind="train")
  w.close()
  got = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["kind"]) for r in got]
  assert keys == [(1, "train"), (3, "train"), (2, "eval"), (2, "train"), (4, "train")]
  assert got[3]["loss"] == 22.0 and got[4]["loss"] == 4.5
  (events,) = (tmp_path / "tb").iterdir()
  ev = _events(events)
  assert ev[0].file_version == "brain.Event:2"
  assert ev[1].session_log.status == ev[1].session_log.START and ev[1].step == 4  # purge
  assert [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in ev[2:]] \
    == [(4, "train/loss", 4.5)]


@pytest.fixture
def small_tmpfs(tmp_path):
  """An 8 MB tmpfs (root only; skips where mounting is not permitted)."""
  mnt = tmp_path / "tmpfs"
  mnt.mkdir()
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
  except FileNotFoundError:
    pytest.skip("no mount command: the full-disk tests need a small tmpfs")
  if proc.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): full-disk tests skipped")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> None:
  st = os.statvfs(mnt)
  with open(mnt / "filler", "wb") as f:
    f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_metric_writer_full_disk_never_leaves_a_torn_line(small_tmpfs):
  w = metric_writer.MetricWriter(small_tmpfs / "run", resume_step=0)
  w.write(1, {"loss": 1.0}, kind="train")
  w.flush()
  _fill(small_tmpfs, 6000)  # about one page and a half
  big = {f"auc_{k}": 0.123456789 for k in range(40)}  # ~1 KB lines
  with pytest.raises(OutputError) as err:
    for step in range(2, 100):
      w.write(step, big, kind="eval")
  assert "No space left on device" in str(err.value)
  assert str(small_tmpfs / "run") in str(err.value)
  w.close()  # what was written is whole: closing has nothing left to fail on
  text = (small_tmpfs / "run" / "metrics.jsonl").read_text()
  records = [json.loads(line) for line in text.splitlines()]  # every line parses
  assert text.endswith("\n") and records[0]["step"] == 1 and len(records) >= 2
  assert [r["step"] for r in records] == list(range(1, len(records) + 1))
  for event_file in (small_tmpfs / "run" / "tb").iterdir():
    _events(event_file)  # whole records only, CRCs valid


# --------------------------------------------------------------------------- checkpoints


def _state(fill: float):
  import jax
  import jax.numpy as jnp

  from lsemil.core.configuration import load_config
  from lsemil.models import mil
  from lsemil.training import trainer

  config = load_config("smoke")
  model = mil.from_config(config.model)
  abstract = trainer.abstract_state(model, trainer.create_optimizer(config), 0)
  return config, jax.tree.map(lambda a: jnp.full(a.shape, fill, a.dtype), abstract)


def _iter():
  import grain

  return iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())


def test_partial_checkpoint_folders_are_never_restored_and_are_removed(tmp_path):
  config, state = _state(0.5)
  mngr = checkpointing.create_manager(tmp_path, keep=5)
  checkpointing.save(mngr, 1, state, _iter(), config=config, meta={"epoch": 1})
  mngr.wait_until_finished()
  mngr.close()
  ckpts = tmp_path / checkpointing.CHECKPOINT_DIR
  # What a save killed mid-write leaves locally: a complete-looking copy under orbax's tmp
  # name (the rename to "2" never happened), and an emptier one.
  shutil.copytree(ckpts / "1", ckpts / "2.orbax-checkpoint-tmp-1234")
  (ckpts / "3.orbax-checkpoint-tmp").mkdir()
  reader = checkpointing.create_manager(tmp_path, read_only=True)
  assert reader.all_steps() == [1] and reader.latest_step() == 1  # orbax ignores them
  assert len(checkpointing.partial_step_dirs(ckpts)) == 2
  _, _, _, step, _ = checkpointing.load_inference(tmp_path, which="latest")
  assert step == 1
  mngr = checkpointing.create_manager(tmp_path, keep=5)  # for writing: cleans up
  assert sorted(p.name for p in ckpts.iterdir()) == ["1"]
  checkpointing.save(mngr, 2, state, _iter(), config=config, meta={"epoch": 2})
  mngr.close()
  assert mngr.all_steps() == [1, 2]


_FULL_SAVE = textwrap.dedent(
  """
  import json, os, sys
  import grain, jax, jax.numpy as jnp
  from lsemil.runtime import checkpointing
  from lsemil.training import trainer
  from lsemil.models import mil
  from lsemil.core.configuration import load_config
  from lsemil.core.errors import OutputError

  workdir, filler = sys.argv[1], sys.argv[2]
  config = load_config("smoke")
  model = mil.from_config(config.model)
  abstract = trainer.abstract_state(model, trainer.create_optimizer(config), 0)
  state = jax.tree.map(lambda a: jnp.full(a.shape, 0.25, a.dtype), abstract)
  it = lambda: iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())
  mngr = checkpointing.create_manager(workdir, keep=5)
  checkpointing.save(mngr, 1, state, it(), config=config, meta={"epoch": 1})
  mngr.wait_until_finished()
  st = os.statvfs(workdir)
  with open(filler, "wb") as f:
    f.write(b"\\0" * (st.f_bavail * st.f_frsize - 100_000))
  errors = []
  for call in (
    lambda: checkpointing.save(mngr, 2, state, it(), config=config, meta={}),
    mngr.wait_until_finished,
    mngr.close,
  ):
    try:
      call()
    except OutputError as e:
      errors.append(str(e))
  print("RESULT " + json.dumps(errors), flush=True)
  """
)


def test_checkpoint_save_on_a_full_disk_is_one_output_error(small_tmpfs, lsemil):
  """In a subprocess (orbax's failed-save threads outlive the error): save, wait, close
  raise ONE OutputError between them, naming the folder, step and errno text."""
  w = small_tmpfs / "w"
  proc = subprocess.run(
    [sys.executable, "-c", _FULL_SAVE, str(w), str(small_tmpfs / "filler")], cwd=REPO,
    env=lsemil.env(), capture_output=True, text=True, timeout=300,
  )
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  assert line, proc.stderr[-3000:]
  (message,) = json.loads(line[0][len("RESULT ") :])  # exactly one error
  ckpts = w / "checkpoints"
  assert message.startswith(f"{ckpts}: cannot save checkpoint step 2: ")
  assert "No space left on device (errno 28)" in message
  assert message.endswith("latest intact checkpoint: step 1")
  (small_tmpfs / "filler").unlink()
  # The failed step's folder is removed when the error is raised; orbax's metadata thread
  # can outlive close() and recreate it, so it may be back: never as a checkpoint.
  assert set(p.name for p in ckpts.iterdir()) <= {"1", "2.orbax-checkpoint-tmp"}
  _, _, variables, step, _ = checkpointing.load_inference(w, which="latest")
  assert step == 1
  import jax

  assert all(np.all(np.asarray(x) == 0.25) for x in jax.tree.leaves(variables["params"]))
  checkpointing.create_manager(w).close()  # a manager for writing removes it for good
  assert sorted(p.name for p in ckpts.iterdir()) == ["1"]


def _train_args(workdir, data_dir, *extra):
  return ["train", "--config", "configs/smoke.py", "--workdir", workdir, "--data-dir", data_dir,
          *extra]


def _params(workdir) -> list[np.ndarray]:
  import jax

  _, _, variables, step, _ = checkpointing.load_inference(workdir, which="latest")
  return step, jax.tree.leaves(variables)


def test_full_disk_during_training_is_one_clear_error(small_tmpfs, synth_dir, jax_cache, lsemil):
  """A real `lsemil train` whose workdir (8 MB tmpfs) fills up after its first checkpoint."""
  _fill(small_tmpfs, 1_000_000)  # room for one smoke checkpoint (about 550 KB on tmpfs)
  w = small_tmpfs / "run"
  proc = lsemil.run(*_train_args(w, synth_dir, "--config.train.checkpoint_every_steps=1"),
              cache=jax_cache)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("lsemil train:")]
  assert len(errors) == 1, out[-3000:]
  assert "No space left on device" in errors[0] and str(w) in errors[0]
  # Which save fills the disk depends on timing (async writes): assert the invariant. The
  # reported step is the newest complete one, it loads, and the failed save came after it.
  failed = re.search(r"cannot save checkpoint step (\d+)", errors[0])
  intact = re.search(r"latest intact checkpoint: step (\d+)", errors[0])
  assert failed and intact, errors[0]
  failed, intact = int(failed.group(1)), int(intact.group(1))
  assert 1 <= intact < failed
  complete = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert complete and complete[-1] == intact, complete
  records = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
  assert records and records[0]["step"] == 1
  (small_tmpfs / "filler").unlink()
  step, _ = _params(w)
  assert step == intact  # the failed save never counts, whatever orbax's threads left behind
  checkpointing.create_manager(w).close()  # what the rerun's manager does first
  assert not checkpointing.partial_step_dirs(w / "checkpoints")


def test_sigkill_during_async_checkpoint_write_resumes_from_last_complete(
  tmp_path, synth_dir, jax_cache, lsemil
):
  """SIGKILL while orbax writes a step folder (polled for), at a few saves; every rerun
  resumes from a complete checkpoint, and the end equals an uninterrupted run."""
  straight = tmp_path / "straight"
  proc = lsemil.run(*_train_args(straight, synth_dir), cache=jax_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  w = tmp_path / "killed"
  ckpts = w / "checkpoints"

  def writing(min_step):
    return [p.name for p in checkpointing.partial_step_dirs(ckpts)
            if int(p.name.partition(".")[0]) >= min_step]

  killed_during = []
  # (the first step whose save is caught, how far into that save): each run resumes from
  # the previous one's last complete checkpoint.
  for min_step, delay in ((1, 0.0), (2, 0.05), (4, 0.2)):
    proc = _popen(lsemil, *_train_args(w, synth_dir, "--config.train.checkpoint_every_steps=1"),
                  cache=jax_cache)
    if not _wait_for(lambda m=min_step: bool(writing(m)), proc):
      proc.wait()
      continue
    time.sleep(delay)
    caught = writing(min_step)
    _kill_group(proc)
    complete = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    killed_during.append((caught, complete))
  caught_any = any(caught for caught, _ in killed_during)
  assert caught_any, f"no save was ever caught in progress: {killed_during}"
  print(f"train SIGKILLed while writing / with complete: {killed_during}")
  last_complete = killed_during[-1][1][-1] if killed_during[-1][1] else None
  rerun = lsemil.run(*_train_args(w, synth_dir, "--config.train.checkpoint_every_steps=1"),
               cache=jax_cache)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  if last_complete is not None:
    assert f"resuming from {ckpts / str(last_complete)} (step {last_complete})" in rerun.stderr
  (sa, va), (sb, vb) = _params(straight), _params(w)
  assert sa == sb == 6
  for x, y in zip(va, vb, strict=True):
    np.testing.assert_array_equal(x, y)
  records = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["kind"]) for r in records]
  assert len(keys) == len(set(keys))  # one line per step and kind, kills notwithstanding
  assert sorted(s for s, k in keys if k == "train") == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- workdir lock

_HOLD = textwrap.dedent(
  """
  import sys, time
  from lsemil.training import workdir_lock
  with workdir_lock.hold(sys.argv[1], heartbeat_s=float(sys.argv[2])) as lock:
    print("HELD", lock.holder.pid, flush=True)
    time.sleep(600)
  """
)


def _holder(lsemil, workdir, heartbeat_s=30.0) -> subprocess.Popen:
  proc = subprocess.Popen(
    [sys.executable, "-c", _HOLD, str(workdir), str(heartbeat_s)], cwd=REPO, env=lsemil.env(),
    stdout=subprocess.PIPE, text=True, start_new_session=True,
  )
  line = proc.stdout.readline()
  assert line.startswith("HELD"), line
  return proc


def test_local_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path, lsemil):
  w = tmp_path / "w"
  proc = _holder(lsemil, w)
  try:
    with pytest.raises(WorkdirBusyError) as err:
      workdir_lock.acquire(w)
    message = str(err.value)
    assert message.startswith(f"{w} is in use by another `lsemil train`")
    assert f"pid {proc.pid}" in message and "host " in message and "started " in message
  finally:
    _kill_group(proc)  # SIGKILL: no chance to release
  with workdir_lock.hold(w) as lock:  # the OS dropped the flock: free at once
    assert lock.holder.pid == os.getpid()
    assert workdir_lock.read_holder(w).pid == os.getpid()
    with pytest.raises(WorkdirBusyError):
      workdir_lock.acquire(w)  # a second open file in the same process is refused too
  with workdir_lock.hold(w):
    pass


def test_second_train_on_one_workdir_refuses_at_once(tmp_path, synth_dir, jax_cache, lsemil):
  w = tmp_path / "w"
  # The first run is long (it is stopped below), so the second one meets it still running
  # however slowly the machine starts Python.
  long_run = ("--config.train.num_steps=100000", "--config.train.eval_every_steps=3")
  first = _popen(lsemil, *_train_args(w, synth_dir, *long_run), cache=jax_cache)
  _wait_for(lambda: (h := workdir_lock.read_holder(w)) is not None and h.pid == first.pid, first)
  assert _wait_for(lambda: (w / "checkpoints" / "3").is_dir(), first), "first run ended"
  start = time.monotonic()
  second = lsemil.run(*_train_args(w, synth_dir, *long_run), cache=jax_cache)
  took = time.monotonic() - start
  assert second.returncode == 1, second.stderr[-3000:]
  _no_traceback(second)
  line = second.stderr.strip().splitlines()[-1]
  assert line.startswith(f"lsemil train: {w} is in use by another `lsemil train`"), line
  assert f"pid {first.pid}" in line
  assert took < 60  # before any compile or write (its setup and imports only)
  first.send_signal(signal.SIGTERM)  # the first run goes on untouched by the second, then stops
  out, _ = first.communicate(timeout=300)
  assert first.returncode == EXIT_PREEMPTED, out[-3000:]
  steps = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 3
  assert json.loads((w / "config.json").read_text())["train"]["num_steps"] == 100000
