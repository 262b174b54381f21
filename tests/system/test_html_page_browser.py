"""The HTML report (lsemil.reporting.html_page) loaded from disk (file://) in headless Chromium.

A probe script injected into a copy of the page records console errors and failed loads, checks
that every image loads (naturalWidth > 0), clicks every in-page link (its target id must exist)
and drives the gallery's sort and class filter.

The report of html_page.write_report: no errors, every image loads, one gallery card per box
image, the gallery sorts and filters in the browser, and (embedded) a screenshot is not blank.

`lsemil reproduce`'s index.html on real output: a tiny smoke model is trained (a few steps),
`lsemil reproduce` runs on it through the CLI, and the page it writes has no errors, every
image loads, and the gallery holds one card per test box case. The same run checks that
training on a CPU is deterministic for a fixed number of cores (a second training of the same
config gives bit-identical predictions).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lsemil.commands import cli
from lsemil.core import configuration
from lsemil.reporting import html_page
from lsemil.training import trainer
from lsemil.workflows import evaluation

# Injected first into <head> of a copy of the page: records errors (including failed image
# loads, via the capture phase) and console.error, then after load checks every image,
# exercises the gallery's controls, and writes the findings into the DOM as JSON.
_PROBE = """<script>
window.__errs=[];
window.addEventListener('error',function(e){
  var t=e.target;window.__errs.push(t&&t.tagName?('load failed: '+t.tagName+' '+(t.src||'')
    .slice(0,60)):('error: '+e.message));},true);
var __ce=console.error;console.error=function(){
  window.__errs.push('console.error: '+Array.prototype.join.call(arguments,' '));
  __ce.apply(console,arguments);};
window.addEventListener('load',function(){setTimeout(function(){
  var r={errors:window.__errs},imgs=Array.prototype.slice.call(document.images);
  r.images=imgs.length;
  r.broken=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);})
    .map(function(i){return i.src.slice(0,60);});
  r.tables=document.querySelectorAll('table').length;
  var items=function(){return Array.prototype.slice.call(
    document.querySelectorAll('.gallery-item'));};
  r.gallery=items().length;
  var cnt=document.getElementById('gallery-count');r.count_text=cnt?cnt.textContent:null;
  var s=document.getElementById('gallery-sort'),c=document.getElementById('gallery-class');
  if(s){
    s.value='dice:0:desc';s.dispatchEvent(new Event('change'));
    r.dice0_desc=items().map(function(e){return parseFloat(e.dataset.dice0);});
    s.value='dice:1:asc';s.dispatchEvent(new Event('change'));
    r.dice1_asc=items().map(function(e){return parseFloat(e.dataset.dice1);});
    s.value='class';s.dispatchEvent(new Event('change'));
    r.by_class=items().map(function(e){return e.dataset.cls;});
    c.value='Mass';c.dispatchEvent(new Event('change'));
    r.mass_visible=items().filter(function(e){return e.style.display!=='none';}).length;
    r.mass_count_text=cnt.textContent;
  }
  var links=Array.prototype.slice.call(document.querySelectorAll('a[href^="#"]'));
  r.links=links.length;
  r.dead_links=links.filter(function(a){a.click();
    return !document.getElementById(decodeURIComponent(location.hash.slice(1)));})
    .map(function(a){return a.getAttribute('href');});
  var pre=document.createElement('pre');pre.id='probe';pre.textContent=JSON.stringify(r);
  document.body.appendChild(pre);},0);});
</script>"""


def _chromium_run(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
  cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
         *args]  # fmt: skip
  return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _probe(exe: str, page: Path, tmp_path: Path) -> dict:
  """Loads a copy of `page` with _PROBE injected; returns the probe's findings."""
  probe = page.with_name("_probe_" + page.name)  # beside the page: relative paths resolve
  probe.write_text(page.read_text().replace("<head>", "<head>\n" + _PROBE, 1))
  out = _chromium_run(exe, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
  probe.unlink()
  m = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
  assert m, f"no probe result; chromium rc {out.returncode}: {out.stderr[-2000:]}"
  return json.loads(html.unescape(m.group(1)))


# ----------------------------------------------------------------------------------------------
# The page of `lsemil reproduce` on a real training run


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


def test_reproduce_index_html_in_chromium(chromium, trained, tmp_path, synth_dir, capsys):
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
  r = _probe(chromium, out / "index.html", tmp_path)
  assert r["errors"] == []
  assert r["broken"] == [] and r["images"] == len(summary["figures"]) + n_cases * 3
  assert r["gallery"] == n_cases and r["count_text"] == f"{n_cases} of {n_cases} images"
  assert r["tables"] >= 6  # Tables 1, 2, 3, spread, calibration, 4 (and the sweep)
  assert r["links"] >= 3 and r["dead_links"] == []  # the nav: tables, figures, gallery


# ----------------------------------------------------------------------------------------------
# The report of html_page.write_report


@pytest.mark.parametrize("embed", [True, False])
def test_report_in_chromium(chromium, tmp_path, report_inputs, embed):
  inputs = report_inputs(n_items=7)
  gallery = inputs["gallery"]
  page = Path(
    html_page.write_report(tmp_path / "results", title="lsemil report", embed=embed, **inputs)
  )
  r = _probe(chromium, page, tmp_path)
  assert r["errors"] == []
  assert r["images"] == 2 + 7 * 3 and r["broken"] == []
  assert r["links"] == 3 and r["dead_links"] == []  # the nav: tables, figures, gallery
  assert r["gallery"] == 7 and r["count_text"] == "7 of 7 images"
  d0 = [g["runs"][0]["dice"] for g in gallery]
  d1 = [g["runs"][1]["dice"] for g in gallery]
  np.testing.assert_allclose(r["dice0_desc"], sorted(d0, reverse=True))
  np.testing.assert_allclose(r["dice1_asc"], sorted(d1))
  assert r["by_class"] == sorted(g["cls"] for g in gallery)
  n_mass = sum(g["cls"] == "Mass" for g in gallery)
  assert r["mass_visible"] == n_mass == 2 and r["mass_count_text"] == "2 of 7 images"
  if embed:  # a screenshot of the page itself, not the probe copy
    shot = tmp_path / "screenshot.png"
    _chromium_run(
      chromium, tmp_path, "--window-size=1280,2200", "--hide-scrollbars", f"--screenshot={shot}",
      page.as_uri(),
    )  # fmt: skip
    with Image.open(shot) as im:
      assert im.format == "PNG" and im.size == (1280, 2200)
      px = np.asarray(im.convert("L"))
    assert px.std() > 10  # not a blank page
    if keep := os.environ.get("LSEMIL_KEEP_SCREENSHOT"):
      shutil.copy(shot, keep)


def test_probe_catches_errors(chromium, tmp_path):
  # The probe must be able to fail: a missing image, a script error and console.error.
  page = tmp_path / "bad.html"
  page.write_text(
    "<!DOCTYPE html><html><head><title>x</title></head><body>"
    '<a href="#nowhere">x</a><p id="here"><a href="#here">y</a></p>'
    '<img src="missing.png"><script>console.error("boom");undefinedFn();</script>'
    "</body></html>"
  )
  r = _probe(chromium, page, tmp_path)
  assert len(r["broken"]) == 1 and r["gallery"] == 0
  assert r["links"] == 2 and r["dead_links"] == ["#nowhere"]
  text = " | ".join(r["errors"])
  assert "load failed: IMG" in text and "console.error: boom" in text and "undefinedFn" in text
