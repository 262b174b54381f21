"""`lsemil serve` through the real server in headless Chromium (lsemil.workflows.viewing).

One server (`lsemil serve --port 0 --browse R` in a subprocess) on a smoke workdir with random
weights and stored operating points. Chromium is driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`, no extra package): it opens the page, a bad and a good PNG are
chosen through the page's own file input (`DOM.setFileInputFiles`), and the findings are read
from the DOM and compared with `lsemil predict` on the same file: every probability to the
page's 3 decimals, every decision. Every request the browser makes is recorded (none may leave
the server) and so is every console message and exception (none but the bad file's 422).
Plain HTTP requests then check the JSON against predict's CSV and boxes.json exactly, and
that no path of /browse reads a file outside the folder ('..', percent-encoded, absolute,
symlinks out), with a foreign Host header or an oversized upload refused, and a DICOM upload
(MONOCHROME1, 16 bits) is read under its plain name.
"""

from __future__ import annotations

import csv
import fcntl
import http.client
import io
import json
import os
import select
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from lsemil.commands import cli
from lsemil.core import configuration
from lsemil.data import findings, imageio
from lsemil.models import registry

CLASSES = findings.of_config(configuration.load_config("smoke"))


class DevTools:
  """A headless Chromium driven over the DevTools protocol on a pipe (fd 3 in, fd 4 out,
  NUL-terminated JSON); `call` waits for a command's result, keeping the events seen."""

  def __init__(self, exe: str, profile: Path):
    (self._in, to_browser), (from_browser, self._out) = os.pipe(), os.pipe()
    # Above 4, so the redirections onto 3 and 4 cannot overwrite one another (bash: dash
    # reads one digit of an fd number).
    from_browser, to_browser = (_above_four(fd) for fd in (from_browser, to_browser))
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
            "--remote-debugging-pipe", "about:blank"]  # fmt: skip
    shell = f'exec "$0" "$@" 3<&{from_browser} 4>&{to_browser}'
    self.proc = subprocess.Popen(
      ["bash", "-c", shell, exe, *args], pass_fds=(from_browser, to_browser),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(from_browser)
    os.close(to_browser)
    self.events: list[dict] = []
    self._buffer, self._id = b"", 0

  def call(self, method: str, session: str | None = None, timeout: float = 60, **params):
    self._id += 1
    msg = {"id": self._id, "method": method, "params": params}
    os.write(self._out, json.dumps(msg | ({"sessionId": session} if session else {})).encode())
    os.write(self._out, b"\0")
    deadline = time.monotonic() + timeout
    while True:
      for reply in self._messages(deadline):
        if reply.get("id") == self._id:
          assert "error" not in reply, f"{method}: {reply['error']}"
          return reply["result"]
        self.events.append(reply)

  def _messages(self, deadline: float) -> list[dict]:
    left = deadline - time.monotonic()
    assert left > 0 and select.select([self._in], [], [], left)[0], "Chromium did not answer"
    chunk = os.read(self._in, 1 << 20)
    assert chunk, "Chromium closed the pipe"
    *done, self._buffer = (self._buffer + chunk).split(b"\0")
    return [json.loads(m) for m in done]

  def close(self) -> None:
    self.proc.kill()
    self.proc.wait()
    os.close(self._in)
    os.close(self._out)


def _above_four(fd: int) -> int:
  high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
  os.close(fd)
  return high


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, random_variables, write_checkpoint) -> Path:
  """A smoke workdir (random weights, step 1) with operating points from a valid evaluation
  (one class without a threshold), as `lsemil evaluate --split valid` stores them."""
  config = configuration.load_config("smoke")
  w = tmp_path_factory.mktemp("serve") / "w"
  write_checkpoint(w, config, random_variables(registry.from_config(config.model, saved=True)), 1)
  thresholds = [float(t) for t in np.linspace(0.3, 0.7, len(CLASSES))]
  thresholds[-1] = None
  ops = {"rule": "youden", "fit_split": "valid", "classes": list(CLASSES), "thresholds": thresholds}
  (w / "evaluation_valid.json").write_text(json.dumps({"step": 1, "operating_points": ops}))
  return w


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
  """A reproduce-like folder R (index.html, a figure) with symlinks pointing out of it, a
  secret file beside it, a good and a bad PNG."""
  root = tmp_path_factory.mktemp("serve_files")
  out, report = root / "secret.txt", root / "R"
  out.write_text("SECRET")
  (report / "index_files").mkdir(parents=True)
  rng = np.random.default_rng(0)
  figure = rng.integers(0, 256, (40, 60), np.uint8)
  assert cv2.imwrite(str(report / "index_files" / "fig.png"), figure)
  (report / "index.html").write_text(
    '<!DOCTYPE html><html><head><title>report</title></head><body><h1>Tables</h1>'
    '<img src="index_files/fig.png" alt="figure"></body></html>'
  )
  (report / "escape.txt").symlink_to(out)
  (report / "outside").symlink_to(root)
  good = root / "chest.png"
  assert cv2.imwrite(str(good), rng.integers(0, 256, (80, 120), np.uint8))
  bad = root / "bad.png"
  bad.write_bytes(b"\xff\xd8\xff not a png at all")
  return {"root": root, "report": report, "good": good, "bad": bad}


class Served:
  """`lsemil serve` started; `base` (the URL) and `port` wait until it prints its URL, so
  the model loads and compiles while the test does other work."""

  def __init__(self, proc: subprocess.Popen, log: Path):
    self.proc, self.log, self._base = proc, log, None

  @property
  def base(self) -> str:
    if self._base is None:
      ready = select.select([self.proc.stdout], [], [], 300)[0]
      line = self.proc.stdout.readline() if ready else ""
      assert line.startswith("serving http://127.0.0.1:"), f"{line!r}\n{self.stderr()}"
      self._base = line.split()[1]
    return self._base

  @property
  def port(self) -> int:
    return int(self.base.rstrip("/").rsplit(":", 1)[1])

  def stderr(self) -> str:
    return self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(workdir, folders, lsemil, tmp_path_factory):
  """`lsemil serve --port 0 --browse R` running (a `Served`); stopped by SIGTERM, it must
  exit 0 without a traceback and remove its folder of uploads."""
  tmp = tmp_path_factory.mktemp("serve_tmp")
  log = tmp / "stderr.txt"
  with open(log, "w") as err:
    proc = lsemil.popen(
      "serve", "--model", workdir, "--port", "0", "--browse", folders["report"], stderr=err,
      env=lsemil.env(TMPDIR=str(tmp)),
    )  # fmt: skip
  served = Served(proc, log)
  try:
    yield served
  finally:
    proc.terminate()
    proc.wait(timeout=60)
  assert proc.returncode == 0 and "Traceback" not in log.read_text(), served.stderr()
  assert not list(tmp.glob("lsemil-serve-*")), "the folder of uploads is left behind"


@pytest.fixture(scope="module")
def predicted(workdir, folders, tmp_path_factory) -> dict:
  """`lsemil predict --boxes` of the good file: its CSV row and its boxes (of the classes at
  or above 0.53, a few of these random weights' probabilities near 0.5: each costs an
  overlay)."""
  out = tmp_path_factory.mktemp("serve_predict")
  argv = ["predict", "--checkpoint", str(workdir), str(folders["good"]), "--out", str(out)]
  assert cli.main([*argv, "--boxes", "--threshold", "0.53", "--no-progress"]) == 0
  (row,) = csv.DictReader(io.StringIO((out / "predictions.csv").read_text()))
  boxes = json.loads((out / "boxes.json").read_text())[folders["good"].name]
  return {"row": row, "boxes": boxes}


def _request(port: int, method: str, path: str, body: bytes | None = None, **headers):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  try:
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    return resp.status, resp.read()
  finally:
    conn.close()


_READ_PAGE = """(() => {
  const cards = Array.from(document.querySelectorAll('.card'));
  return cards.map((c) => ({
    name: c.querySelector('h2').textContent, state: c.dataset.state,
    error: (c.querySelector('.error') || {}).textContent || null,
    rows: Array.from(c.querySelectorAll('table.findings tbody tr')).map((r) => [r.dataset.class,
      r.querySelector('td.p').textContent, r.cells[r.cells.length - 1].textContent]),
    selected: (c.querySelector('tr.selected') || {dataset: {}}).dataset.class || null,
    overlay: (c.querySelector('img.map') || {}).src || '',
    images: Array.from(c.querySelectorAll('img')).map((i) => i.complete && i.naturalWidth > 0),
    boxes: c.querySelectorAll('svg rect').length,
    download: (c.querySelector('a.download') || {}).download || null,
    caption: (c.querySelector('.caption') || {}).textContent || null,
  }));
})()"""


def _until(tab: DevTools, session: str, expression: str, timeout: float = 120):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    got = tab.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
    if got["result"].get("value"):
      return got["result"]["value"]
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {expression}")


def test_page_predicts_like_lsemil_predict(chromium, server, folders, predicted, tmp_path):
  base = server.base
  tab = DevTools(chromium, tmp_path / "profile")
  try:
    target = tab.call("Target.createTarget", url="about:blank")["targetId"]
    s = tab.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Network", "Log"):
      tab.call(f"{domain}.enable", s)
    tab.call("Page.navigate", s, url=base)
    _until(tab, s, "document.getElementById('model').textContent.includes('step 1')")
    root = tab.call("DOM.getDocument", s)["root"]["nodeId"]
    node = tab.call("DOM.querySelector", s, nodeId=root, selector="#files")["nodeId"]
    files = [str(folders["bad"]), str(folders["good"])]
    tab.call("DOM.setFileInputFiles", s, nodeId=node, files=files)
    done = "Array.from(document.querySelectorAll('.card')).every(c => c.dataset.state === "
    _until(tab, s, f"{done}'done' || c.dataset.state === 'error') && "
           "document.querySelectorAll('.card').length === 2")  # fmt: skip
    cards = {c["name"]: c for c in _until(tab, s, _READ_PAGE)}
    tab.call("Runtime.evaluate", s, expression="document.getElementById('tab-report').click()")
    frame = "document.getElementById('report-frame').contentDocument"
    report = _until(tab, s, f"{frame} && {frame}.querySelector('h1') && "
                    f"{frame}.images[0].naturalWidth")  # fmt: skip
  finally:
    tab.close()

  bad = cards["bad.png"]
  assert bad["state"] == "error" and bad["rows"] == []
  assert bad["error"].startswith("bad.png: named .png but not a PNG file"), bad["error"]
  good = cards["chest.png"]
  assert good["state"] == "done" and good["error"] is None
  row = predicted["row"]
  probs = {c: float(row[c]) for c in CLASSES}
  assert [r[0] for r in good["rows"]] == sorted(CLASSES, key=lambda c: -probs[c])
  for cls, shown, decision in good["rows"]:
    assert len(shown) == 5 and abs(float(shown) - probs[cls]) <= 5e-4 + 1e-9, (cls, shown)
    want = {"1": "positive", "0": "negative", "": "\u2014"}[row[f"{cls}_decision"]]
    assert decision == want, cls
  # thresholds from 0.3 to 0.7 over probabilities near 0.5, one class without a threshold
  assert {d for *_, d in good["rows"]} == {"positive", "negative", "\u2014"}
  top = good["rows"][0][0]
  assert good["selected"] == top and good["caption"] == f"saliency S of {top}"
  assert good["overlay"].startswith("data:image/png;base64,")
  assert good["boxes"] == len(predicted["boxes"][top])  # the most probable class has p >= 0.53
  assert len(good["images"]) == 3 and all(good["images"])  # X-ray, overlay, colour scale
  assert good["download"] == "chest.lsemil.json"
  assert report == 60  # the report's figure loaded in the frame

  requests = [e["params"]["request"]["url"] for e in tab.events
              if e.get("method") == "Network.requestWillBeSent"]  # fmt: skip
  assert f"{base}api/predict" in requests and f"{base}browse/" in requests
  assert all(u.startswith((base, "data:", "blob:")) for u in requests), requests
  errors = [e for e in tab.events if e.get("method") in (
    "Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")]  # fmt: skip
  unexpected = [
    e for e in errors
    if not (e["method"] == "Log.entryAdded" and e["params"]["entry"].get("source") == "network"
            and e["params"]["entry"].get("url") == f"{base}api/predict")
    and not (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] not in (
      "error", "assert", "warning"))
  ]  # fmt: skip
  assert unexpected == [], unexpected


def test_json_equals_predict_and_bad_uploads_get_one_line(server, folders, predicted):
  port = server.port
  name = {"X-File-Name": "chest.png"}
  status, body = _request(port, "POST", "/api/predict", folders["good"].read_bytes(), **name)
  assert status == 200
  result = json.loads(body)["result"]
  row = predicted["row"]
  assert [f["class"] for f in result["findings"]] == list(CLASSES)
  for f in result["findings"]:
    assert np.float32(f["probability"]) == np.float32(row[f["class"]]), f["class"]
  assert predicted["boxes"] and all(result["boxes"][c] == b for c, b in predicted["boxes"].items())
  assert result["image_size"] == {"height": 80, "width": 120}
  status, body = _request(port, "POST", "/api/predict", b"", **{"X-File-Name": "empty.dcm"})
  assert status == 422 and json.loads(body)["error"].startswith("empty.dcm: ")
  huge = {"X-File-Name": "huge.png", "Content-Length": str(imageio.MAX_FILE_BYTES + 1)}
  status, body = _request(port, "POST", "/api/predict", None, **huge)
  assert status == 413 and "huge.png: " in json.loads(body)["error"]


@pytest.mark.parametrize(
  "path",
  [
    "/browse/../secret.txt",
    "/browse/%2e%2e/secret.txt",
    "/browse/%2E%2E%2Fsecret.txt",
    "/browse/index_files/..%2f..%2fsecret.txt",
    "/browse/escape.txt",
    "/browse/outside/secret.txt",
    "/browse//" + "/".join(("", "etc", "passwd")),
    "/browse/%2Fetc%2Fpasswd",
    "/browse/%00",
    "/static/../secret.txt",
    "/../secret.txt",
  ],
)
def test_no_path_reads_outside_the_folder(server, path):
  status, body = _request(server.port, "GET", path)
  assert status in (403, 404) and b"SECRET" not in body and b"root:" not in body


def test_folder_files_and_foreign_hosts(server):
  port = server.port
  assert _request(port, "GET", "/browse/")[0] == 200
  status, body = _request(port, "GET", "/browse/index_files/fig.png")
  assert status == 200 and body.startswith(imageio.PNG_SIGNATURE)
  assert _request(port, "GET", "/", Host="evil.example")[0] == 403  # DNS rebinding
  assert _request(port, "GET", "/", Host=f"localhost:{port}")[0] == 200


def test_dicom_upload(server, write_dicom, tmp_path):
  raw = np.random.default_rng(1).integers(0, 4096, (70, 90), dtype=np.uint16)
  path = write_dicom(tmp_path / "scan.dcm", raw, photometric="MONOCHROME1")
  header = {"X-File-Name": "..%2F..%2Fscan%201.dcm"}  # the page percent-encodes the name
  status, body = _request(server.port, "POST", "/api/predict", path.read_bytes(), **header)
  assert status == 200, body[:300]
  result = json.loads(body)["result"]
  assert result["file"] == "scan 1.dcm" and result["image_size"] == {"height": 70, "width": 90}
  assert len(result["findings"]) == len(CLASSES)
