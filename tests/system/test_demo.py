"""`lsemil demo --quick` end to end, then README's "From demo to predict" on its output.

Runs the real command in a subprocess (synth -> prepare -> train -> evaluate -> reproduce)
from a regular (non-editable) install of the package, in an empty directory, and checks the
bar of the quick mode: mean test AUC >= 0.75 and DICE above a uniform map. The demo runs
once (a module fixture); the second test runs README's commands and Python block on its
output as they are written there (export -> predict -> lsemil.load), adding a real NIH PNG
to predict's files, and compares predict's CSV with lsemil.load's numbers.
"""

from __future__ import annotations

import http.client
import json
import math
import pathlib
import re
import select
import shlex
from types import SimpleNamespace

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, installed) -> SimpleNamespace:
  """`lsemil demo --quick` of a regular install in a fresh virtualenv, run in an empty
  directory: its output is ./lsemil_demo there, as README's walkthrough expects."""
  work = tmp_path_factory.mktemp("demo")
  proc = installed("demo", "--quick", cwd=work, timeout=1800)
  return SimpleNamespace(work=work, out=work / "lsemil_demo", proc=proc)


def test_demo_quick_end_to_end(demo):
  assert sorted(p.name for p in demo.work.iterdir()) == ["lsemil_demo"]  # all in its --out
  results, proc = demo.out / "results", demo.proc
  # figure_levels.png: one model's saliency at each level of the up path (the paper's Figure 1
  # proper, figure1.png, needs the N = 8..64 models of `--figure1`); index.html: everything.
  for name in ("table1.md", "table2.md", "table3.md", "figure_levels.png", "figure3.png",
               "summary.json", "demo_summary.json", "report.md", "index.html"):
    assert (results / name).is_file(), f"missing {name}"
    assert (results / name).stat().st_size > 100, f"{name} is nearly empty"
  summary = json.loads((results / "demo_summary.json").read_text())
  (run,) = summary["runs"].values()
  # On a CPU the run trained as a pinned `lsemil train` subprocess with its own log.
  log = pathlib.Path(run["workdir"]) / "train.log"
  assert "best checkpoint:" in log.read_text(), log
  assert " on core " in proc.stderr
  assert run["mean_auc"] >= 0.75, run
  assert not math.isnan(run["mean_dice"])
  assert run["mean_dice"] > run["mean_dice_uniform"], run
  # The printed summary names the results and states the bar.
  assert "test mean AUC" in proc.stdout and "bar:" in proc.stdout
  # The layout of the paper's Table 3 with its reference columns.
  table3 = (results / "table3.md").read_text()
  assert "(paper)" in table3 and "Nodule" in table3 and "A.V.G." in table3


def walkthrough() -> tuple[list[list[str]], str]:
  """README's "From demo to predict": its shell commands (split as a shell would) and its
  Python block."""
  text = README.read_text().split("### From demo to predict\n", 1)[1].split("\n### ", 1)[0]
  shell = re.search(r"```bash\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
  commands = [shlex.split(line, comments=True) for line in shell.splitlines()]
  return [c for c in commands if c], re.search(r"```python\n(.*?)```", text, re.S).group(1)


# Run after README's block in the same process: lsemil.load's numbers for predict's files,
# in one batch as predict ran them (XLA may round the last bit differently per batch size).
SAME_FILES = """
import json as _json, sys as _sys
print(_json.dumps([result.probs[_c] for _c in model.classes]))
_got = model.predict(_sys.argv[1:])
print(_json.dumps([[_r.probs[_c] for _c in model.classes] for _r in _got]))
"""


def test_readme_from_demo_to_predict(demo, installed, request, tmp_path):
  commands, code = walkthrough()
  assert commands[0] == ["lsemil", "demo", "--quick"], "README's walkthrough starts otherwise"
  assert all(argv[0] == "lsemil" for argv in commands), commands
  real, no_real = _real_png(request)
  serve = [argv for argv in commands if argv[1] == "serve"]
  started = {}
  for argv in commands[1:]:
    if argv[1] == "serve":
      continue  # started beside predict
    if argv[1] == "predict":
      files = [a for a in argv if a.endswith(".png")]
      names = {pathlib.Path(f).name for f in files}  # a second file of a name renames outputs
      extra = [str(p) for p in real if p.name not in names][:1]
      files, argv = files + extra, argv + extra
      out = demo.work / argv[argv.index("--out") + 1]
      threshold = float(argv[argv.index("--threshold") + 1])
      # README's Python block and server beside predict: all three only read the export
      started["driver"] = installed.python(code + SAME_FILES, *files, cwd=demo.work)
      for argv_serve in serve:
        started["serve"] = _serve(installed, argv_serve, demo.work, tmp_path / "serve.log")
    installed(*argv[1:], cwd=demo.work)
  assert "driver" in started, "README's walkthrough has no predict command"
  exported = demo.work / "lsemil_demo" / "export_r05"
  assert "Synthetic phantoms" in (exported / "README.md").read_text()  # the demo's data
  classes, csv = _predictions(out, files)
  _same_as_load(started["driver"], csv)
  _overlays(out, files, classes, csv, threshold)
  if serve:
    uploads = [demo.work / f for f in files]  # README's paths are relative to its directory
    _same_as_served(started["serve"], uploads, classes, csv, tmp_path / "serve.log")
  if no_real:
    pytest.skip(f"README's walkthrough passed on the demo's phantom; no real NIH PNG: {no_real}")


def _real_png(request) -> tuple[list[pathlib.Path], str | None]:
  """The real NIH PNGs of the test data, or [] and why there are none."""
  try:
    return sorted(request.getfixturevalue("nih_samples_dir").glob("*.png")), None
  except pytest.skip.Exception as e:
    return [], str(e)


def _predictions(out: pathlib.Path, files: list[str]) -> tuple[list[str], np.ndarray]:
  """predict's classes and probabilities (one row per file, in order) from its CSV."""
  table = (out / "predictions.csv").read_text().splitlines()
  head, rows = table[0].split(","), [r.split(",") for r in table[1:]]
  classes = head[2 : head.index("path")]
  assert [r[head.index("path")] for r in rows] == files
  return classes, np.array([[float(v) for v in r[2 : 2 + len(classes)]] for r in rows])


def _same_as_load(driver, csv: np.ndarray) -> None:
  """README's Python block's `result` (one image: the phantom, predict's first file) is
  predict's row to 1e-6 (a batch of one may round the last bit otherwise); lsemil.load's
  numbers for predict's files are predict's to the CSV's float32 digits."""
  stdout, stderr = driver.communicate(timeout=300)
  assert driver.returncode == 0, stderr[-3000:]
  readme, same = stdout.strip().split("\n")[-2:]
  loaded = np.array(json.loads(same))
  np.testing.assert_array_equal(csv.astype(np.float32), loaded.astype(np.float32))
  np.testing.assert_allclose(json.loads(readme), csv[0], atol=1e-6, rtol=0)


def _overlays(out, files, classes, csv, threshold: float) -> None:
  """An overlay and boxes for every class at or above the threshold, and only those."""
  boxes = json.loads((out / "boxes.json").read_text())
  for row, path in zip(csv, files, strict=True):
    stem = pathlib.Path(path).stem
    want = {c for c, p in zip(classes, row, strict=True) if p >= threshold}
    assert {p.name for p in out.glob(f"{stem}_*.png")} == {f"{stem}_{c}.png" for c in want}
    assert set(boxes[pathlib.Path(path).name]) == want


def _serve(installed, argv: list[str], cwd: pathlib.Path, log: pathlib.Path):
  """README's `lsemil serve` started (its stdout piped, its stderr to `log`)."""
  with open(log, "w") as err:
    return installed.popen(*argv[1:], cwd=cwd, stderr=err)


def _same_as_served(proc, files, classes, csv: np.ndarray, log: pathlib.Path) -> None:
  """Each file uploaded to the server as its page does: the probabilities are predict's (to
  1e-6: the server predicts one file a batch, predict ran them together)."""
  try:
    ready = select.select([proc.stdout], [], [], 300)[0]
    line = proc.stdout.readline() if ready else ""
    assert line.startswith("serving http://127.0.0.1:"), f"{line!r}\n{log.read_text()[-3000:]}"
    port = int(line.split()[1].rstrip("/").rsplit(":", 1)[1])
    for path, want in zip(files, csv, strict=True):
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
      conn.request("POST", "/api/predict", path.read_bytes(), {"X-File-Name": path.name})
      resp = conn.getresponse()
      got = json.loads(resp.read())
      conn.close()
      assert resp.status == 200, got
      served = {f["class"]: f["probability"] for f in got["result"]["findings"]}
      np.testing.assert_allclose([served[c] for c in classes], want, atol=1e-6)
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  assert proc.returncode == 0, log.read_text()[-3000:]
