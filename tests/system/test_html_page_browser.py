"""`lsemil reproduce`'s index.html on real output, in headless Chromium.

A tiny smoke model is trained (a few steps), `lsemil reproduce` runs on it through the CLI,
and the page it writes is loaded from disk: no console errors, every image loads
(naturalWidth > 0), and the gallery holds one card per test box case. The same run checks
that training on a CPU is deterministic for a fixed number of cores (a second training of
the same config gives bit-identical predictions).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lsemil.commands import cli
from lsemil.core import configuration
from lsemil.training import trainer
from lsemil.workflows import evaluation

_PROBE = """<script>
window.__errs=[];
window.addEventListener('error',function(e){
  var t=e.target;window.__errs.push(t&&t.tagName?('load failed: '+t.tagName+' '+(t.src||'')
    .slice(0,60)):('error: '+e.message));},true);
var __ce=console.error;console.error=function(){
  window.__errs.push('console.error: '+Array.prototype.join.call(arguments,' '));
  __ce.apply(console,arguments);};
window.addEventListener('load',function(){setTimeout(function(){
  var imgs=Array.prototype.slice.call(document.images);
  var r={errors:window.__errs,images:imgs.length,
    broken:imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);}).length,
    gallery:document.querySelectorAll('.gallery-item').length,
    count_text:(document.getElementById('gallery-count')||{}).textContent||null,
    tables:document.querySelectorAll('table').length};
  var pre=document.createElement('pre');pre.id='probe';pre.textContent=JSON.stringify(r);
  document.body.appendChild(pre);},0);});
</script>"""


def _chromium() -> str:
  for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
    if path := shutil.which(name):
      return path
  pytest.skip("headless Chromium not found (Debian: apt-get install chromium; .ci/run does)")


def _probe(exe: str, page: Path, tmp_path: Path) -> dict:
  probe = page.with_name("_probe_" + page.name)  # beside the page: relative paths resolve
  probe.write_text(page.read_text().replace("<head>", "<head>\n" + _PROBE, 1))
  cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]  # fmt: skip
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
  probe.unlink()
  m = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
  assert m, f"no probe result; chromium rc {out.returncode}: {out.stderr[-2000:]}"
  return json.loads(html.unescape(m.group(1)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dir):
  """Two trainings of the same tiny smoke config into two workdirs."""
  tmp = tmp_path_factory.mktemp("trained")
  config = configuration.load_config("smoke")
  config.train.num_steps = 4
  config.train.eval_every_steps = 4
  for name in ("a", "b"):
    trainer.train_and_evaluate(config, str(tmp / name), data_dir=str(synth_dir))
  return tmp


def test_cpu_training_is_deterministic_at_a_fixed_core_count(trained):
  a = (trained / "a" / trainer.VALIDATION_PREDICTIONS).read_bytes()
  b = (trained / "b" / trainer.VALIDATION_PREDICTIONS).read_bytes()
  assert a == b


def test_reproduce_index_html_in_chromium(trained, tmp_path, synth_dir, capsys):
  exe = _chromium()
  out = tmp_path / "R"
  argv = ["reproduce", "--run", f"r0=5:{trained / 'a'}", "--run", f"r0=10:{trained / 'b'}"]
  argv += ["--out", str(out), "--n-boot", "10", "--figure-images", "2", "--no-progress"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert f"report: {out / 'index.html'}" in printed
  summary = json.loads((out / "summary.json").read_text())
  index = evaluation.open_index(configuration.load_config("smoke"), synth_dir)
  n_cases = sum(len(v) for v in evaluation.box_cases(index, index.rows("test")).values())
  assert summary["gallery_items"] == n_cases > 0
  r = _probe(exe, out / "index.html", tmp_path)
  assert r["errors"] == []
  assert r["broken"] == 0 and r["images"] == len(summary["figures"]) + n_cases * 3
  assert r["gallery"] == n_cases and r["count_text"] == f"{n_cases} of {n_cases} images"
  assert r["tables"] >= 6  # Tables 1, 2, 3, spread, calibration, 4 (and the sweep)
