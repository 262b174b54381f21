"""lsemil.reporting.html_page and lsemil.reporting.plots: Markdown conversion, figures,
thumbnails, and the report's structure (self-contained, embedded or linked images). The report
in headless Chromium is tested in tests/system/test_html_page_browser.py."""

from __future__ import annotations

import io
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from lsemil.data.nih import CLASSES
from lsemil.metrics import classification
from lsemil.reporting import html_page, paper_tables, plots

# ----------------------------------------------------------------------------------------------
# Markdown


def test_markdown_table_to_html():
  md = "| a | b & c |\n|:---|---:|\n| **0.9** | <x> |\n"
  out = html_page.markdown_to_html(md)
  assert out.count("<table>") == 1 and out.count("<tr>") == 2
  assert '<th style="text-align:left">a</th>' in out
  assert '<th style="text-align:right">b &amp; c</th>' in out
  assert '<td style="text-align:left"><b>0.9</b></td>' in out
  assert "&lt;x&gt;" in out and "<x>" not in out
  text = "# Head\n\nsome `code` and **bold**\ncontinued\n\n" + md + "Bold rule: see CSV.\n"
  out = html_page.markdown_to_html(text)
  assert "<h3>Head</h3>" in out
  assert "<p>some <code>code</code> and <b>bold</b> continued</p>" in out
  assert out.index("<table>") < out.index("<p>Bold rule: see CSV.</p>")


def test_report_tables_convert():
  run = {"label": "r0=5", "auc": [0.7] * 14, "dice": {"Mass": 0.3}}
  md, _ = paper_tables.table3([run, {**run, "label": "r0=10", "auc": [0.8] * 14}])
  out = html_page.markdown_to_html(md)
  n_rows = len([x for x in md.splitlines() if x.startswith("|")]) - 1  # minus the align row
  assert out.count("<tr>") == n_rows
  assert "<b>0.800</b>" in out and "**" not in out


# ----------------------------------------------------------------------------------------------
# Plots


def test_roc_curve_area_is_roc_auc():
  rng = np.random.default_rng(0)
  y = rng.random(200) < 0.3
  s = np.round(y + rng.normal(size=200), 1)  # ties, including positive-negative ties
  fpr, tpr = plots.roc_curve(y, s)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
  assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
  area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
  assert area == pytest.approx(classification.roc_auc(y, s), abs=1e-12)
  assert plots.roc_curve(np.zeros(5), np.arange(5))[0].size == 0


def _png_size(path) -> tuple[int, int]:
  with Image.open(path) as im:
    assert im.format == "PNG"
    return im.size


def test_roc_curves_and_reliability_diagrams(tmp_path):
  rng = np.random.default_rng(1)
  y = rng.random((150, 14)) < 0.2
  y[:, 13] = False  # a class without positives: 'n/a'
  runs = [(f"r0={r}", 1 / (1 + np.exp(-(2 * y + rng.normal(size=y.shape) - 1)))) for r in (5, 10)]
  fig = plots.roc_curves(tmp_path / "roc.png", y, runs, CLASSES)
  w, h = _png_size(tmp_path / "roc.png")
  assert w > 800 and h > 800
  axes = fig.get_axes()
  assert len(axes) == 16 and sum(ax.get_visible() and ax.axison for ax in axes) == 14
  assert len(axes[0].get_lines()) == 3  # diagonal + 2 runs
  assert axes[13].get_title().endswith("(n/a)") and len(axes[13].get_lines()) == 1
  fitted = {"r0=5": np.clip(runs[0][1] * 0.5, 0, 1)}
  fig = plots.reliability_diagrams(tmp_path / "rel.png", y, runs, fitted=fitted)
  _png_size(tmp_path / "rel.png")
  ax0, ax1 = fig.get_axes()[:2]
  assert len(ax0.get_lines()) == 3 and len(ax1.get_lines()) == 2  # perfect + raw (+ fitted)
  assert "ECE" in ax0.get_legend().get_texts()[1].get_text()


def test_thumbnail():
  img = np.zeros((64, 64))
  img[:, 32:] = 1.0
  sal = np.zeros((4, 4))
  sal[0, 0] = 1.0  # the top-left 16x16 source pixels = 32x32 thumbnail pixels
  data = plots.thumbnail(img, sal, [[512, 512, 256, 256]], source_size=1024, size=128)
  im = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
  assert im.shape == (128, 128, 3)
  jet = matplotlib.colormaps["jet"]

  def blend(grey, s):  # 0.5 grey + 0.5 jet(s), in 0..255
    return np.round(255 * (0.5 * grey + 0.5 * np.asarray(jet(s)[:3])))

  np.testing.assert_allclose(im[10, 10], blend(0.0, 1.0), atol=1)  # dark red over black
  np.testing.assert_allclose(im[100, 20], blend(0.0, 0.0), atol=1)  # dark blue over black
  np.testing.assert_allclose(im[100, 100], blend(1.0, 0.0), atol=1)  # over white
  assert tuple(im[64, 80]) == (0, 255, 0)  # box outline at 512/1024 * 128 = 64
  assert tuple(im[70, 80]) != (0, 255, 0)  # inside the box: not filled
  plain = np.asarray(Image.open(io.BytesIO(plots.thumbnail(img, size=128))).convert("L"))
  assert plain[5, 5] == 0 and plain[5, 120] == 255  # no overlay: the grey image
  jpeg = plots.thumbnail(img, sal, size=128, format="jpeg")
  assert jpeg[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(jpeg)).size == (128, 128)
  with pytest.raises(ValueError, match="format"):
    plots.thumbnail(img, format="gif")


# ----------------------------------------------------------------------------------------------
# The report (structure, without a browser)


class _Tags(HTMLParser):
  def __init__(self):
    super().__init__()
    self.tags: list[tuple[str, dict]] = []

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))


def _parse(path) -> list[tuple[str, dict]]:
  p = _Tags()
  p.feed(Path(path).read_text())
  return p.tags


@pytest.mark.parametrize("embed", [True, False])
def test_write_report_is_self_contained(tmp_path, report_inputs, embed):
  out = html_page.write_report(tmp_path / "results", title="t <1>", embed=embed, **report_inputs())
  assert Path(out) == tmp_path / "results" / "index.html"
  text = Path(out).read_text()
  tags = _parse(out)
  srcs = [a["src"] for t, a in tags if t == "img"]
  assert len(srcs) == 2 + 5 * 3  # figures + (ground truth + 2 runs) per item
  assert sum(1 for t, a in tags if "gallery-item" in a.get("class", "")) == 5
  # No network and no external script / style sheet.
  assert not re.search(r"(src|href)=\"(https?:)?//", text)
  assert not any(t in ("link", "iframe") or (t == "script" and "src" in a) for t, a in tags)
  if embed:
    assert all(re.match(r"data:image/(png|jpeg);base64,", s) for s in srcs)
    assert sum(s.startswith("data:image/jpeg") for s in srcs) == 5 * 3  # gallery: JPEG
    assert not (tmp_path / "results" / html_page.ASSETS).exists()
  else:
    assert not any(s.startswith("data:") or os.path.isabs(s) for s in srcs)
    assert all((tmp_path / "results" / s).is_file() for s in srcs)
  ids = [a["id"] for _, a in tags if "id" in a]
  assert len(ids) == len(set(ids)), "duplicate element ids"
  assert "<title>t &lt;1&gt;</title>" in text and "<p id='raw'>x</p>" in text


def test_every_in_page_link_has_its_target(tmp_path, report_inputs):
  tags = _parse(html_page.write_report(tmp_path / "r", title="t", **report_inputs(n_items=2)))
  targets = [a["href"][1:] for t, a in tags if t == "a" and a.get("href", "").startswith("#")]
  ids = {a["id"] for _, a in tags if "id" in a}
  assert len(targets) == 3 and [t for t in targets if t not in ids] == []


def test_write_report_auto_embed_and_links_beside(tmp_path, report_inputs, monkeypatch):
  gallery = report_inputs(n_items=1)["gallery"]
  res = tmp_path / "res"
  plots.roc_curves(
    res / "roc.png", np.array([[1], [0]]), [("a", np.array([[0.6], [0.4]]))], ["Mass"]
  )
  out = html_page.write_report(
    res, title="t", figures=[("roc", res / "roc.png")], gallery=gallery
  )
  assert "data:image/png" in Path(out).read_text()  # small: embedded
  monkeypatch.setattr(html_page, "EMBED_LIMIT", 10)
  out = html_page.write_report(
    res, title="t", figures=[("roc", res / "roc.png")], gallery=gallery
  )
  srcs = [a["src"] for t, a in _parse(out) if t == "img"]
  assert srcs[0] == "roc.png"  # already beside the page: linked where it is
  assert all(s.startswith(html_page.ASSETS + "/") for s in srcs[1:])
