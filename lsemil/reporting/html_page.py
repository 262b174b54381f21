"""A self-contained HTML report of a reproduction (Sec 4 of Yao et al. 2018).

`write_report(out_dir, title=..., tables=..., figures=..., gallery=...)` writes
out_dir/index.html: the tables (Markdown pipe tables as `lsemil.reporting.paper_tables` writes
them, or HTML), the figures (PNG), and a gallery of test images with boxes, each with the
ground truth and every run's saliency with its DICE, sortable by class and by each run's DICE
and filterable by class. It needs no server and no network: no external script, style sheet
or font; images are embedded as data URIs or written beside the page under index_files/ with
relative paths; the gallery's sorting is a few lines of inline JavaScript.

`gallery_item` builds one gallery entry from an image, its boxes and the runs' saliency maps
(thumbnails by `lsemil.reporting.plots.thumbnail`, DICE by `lsemil.metrics.overlap.box_dice`
unless given).
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import numpy as np
from etils import epath

from lsemil.core import fileio
from lsemil.data.nih import ORIGINAL_SIZE
from lsemil.metrics import overlap
from lsemil.reporting import plots

ImageData = bytes | str | os.PathLike  # PNG / JPEG bytes, or a path to such a file
ASSETS = "index_files"  # folder beside index.html for images that are not embedded
EMBED_LIMIT = 24 * 2**20  # embed='auto' embeds when all images together are at most this


class GalleryRun(TypedDict, total=False):
  label: str  # run label, e.g. 'r0=5'
  overlay: ImageData  # that run's saliency for the item's class over the image
  dice: float | None  # its DICE against the item's boxes


class GalleryItem(TypedDict, total=False):
  image: ImageData  # the image with its ground-truth boxes drawn
  cls: str  # the box class (key 'class' is accepted too)
  runs: Sequence[GalleryRun]
  caption: str  # e.g. the image file name


# ----------------------------------------------------------------------------------------------
# Markdown (only what reporting.paper_tables writes: pipe tables, **bold**, paragraphs, # headings)

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def inline_html(text: str) -> str:
  """Escapes text for HTML, then **x** -> <b>x</b> and `x` -> <code>x</code>."""
  out = _BOLD.sub(r"<b>\1</b>", html.escape(text, quote=False))
  return _CODE.sub(r"<code>\1</code>", out)


def _cells(line: str) -> list[str]:
  line = line.strip()
  if line.startswith("|"):
    line = line[1:]
  if line.endswith("|"):
    line = line[:-1]
  return [c.strip() for c in line.split("|")]


def _align(spec: str) -> str:
  s = spec.strip()
  if s.startswith(":") and s.endswith(":"):
    return "center"
  return "right" if s.endswith(":") else "left"


def markdown_table_to_html(lines: Sequence[str]) -> str:
  """A Markdown pipe table (header, alignment row, body rows) as an HTML <table>."""
  header = _cells(lines[0])
  has_align = len(lines) > 1 and re.fullmatch(
    r"\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?", lines[1].strip()
  )
  aligns = [_align(s) for s in _cells(lines[1])] if has_align else ["left"] * len(header)
  body = lines[2:] if has_align else lines[1:]

  def row(cells: list[str], tag: str) -> str:
    tds = []
    for i, c in enumerate(cells):
      a = aligns[i] if i < len(aligns) else "left"
      tds.append(f'<{tag} style="text-align:{a}">{inline_html(c)}</{tag}>')
    return "<tr>" + "".join(tds) + "</tr>"

  return (
    "<table>\n<thead>"
    + row(header, "th")
    + "</thead>\n<tbody>\n"
    + "\n".join(row(_cells(b), "td") for b in body)
    + "\n</tbody>\n</table>"
  )


def markdown_to_html(text: str) -> str:
  """Markdown as `paper_tables` writes it -> HTML: pipe tables, paragraphs, # headings."""
  out, para, table = [], [], []

  def flush():
    if para:
      out.append("<p>" + inline_html(" ".join(para)) + "</p>")
      para.clear()
    if table:
      out.append(markdown_table_to_html(table))
      table.clear()

  for line in text.splitlines():
    s = line.strip()
    if s.startswith("|"):
      if para:
        flush()
      table.append(s)
      continue
    if table:
      flush()
    if not s:
      flush()
    elif m := re.match(r"(#{1,6})\s+(.*)", s):
      flush()
      level = min(len(m.group(1)) + 2, 6)  # below the page's own h1 / h2
      out.append(f"<h{level}>{inline_html(m.group(2))}</h{level}>")
    else:
      para.append(s)
  flush()
  return "\n".join(out)


def _as_html(content: str) -> str:
  return content if content.lstrip().startswith("<") else markdown_to_html(content)


# ----------------------------------------------------------------------------------------------
# Images


def _mime(data: bytes, name: str = "") -> str:
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "image/png"
  if data[:3] == b"\xff\xd8\xff":
    return "image/jpeg"
  if data[:6] in (b"GIF87a", b"GIF89a"):
    return "image/gif"
  raise ValueError(f"{name or 'image'}: not a PNG, JPEG or GIF")


def _read(img: ImageData) -> bytes:
  if isinstance(img, bytes | bytearray):
    return bytes(img)
  return epath.Path(fileio.resolve(img)).read_bytes()


class _Images:
  """Turns image data into <img src> values: data URIs, or files under out_dir/index_files."""

  def __init__(self, out_dir: epath.Path, embed: bool):
    self.out_dir, self.embed, self.n = out_dir, embed, 0

  def src(self, img: ImageData) -> str:
    if not self.embed and not isinstance(img, bytes | bytearray):
      p = Path(fileio.resolve(img))
      if not fileio.is_remote(self.out_dir):
        try:  # already beside the page: link to it where it is
          return p.relative_to(Path(str(self.out_dir))).as_posix()
        except ValueError:
          pass
    data = _read(img)
    mime = _mime(data, "" if isinstance(img, bytes | bytearray) else os.fspath(img))
    if self.embed:
      return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    self.n += 1
    name = f"{ASSETS}/img{self.n:05d}.{mime.split('/')[1]}"
    fileio.write_bytes(self.out_dir / name, data)
    return name


def _size(img: ImageData) -> int:
  if isinstance(img, bytes | bytearray):
    return len(img)
  return epath.Path(fileio.resolve(img)).stat().length


def _all_images(figures, gallery) -> list[ImageData]:
  imgs = [p for _, p in figures]
  for item in gallery:
    imgs.append(item["image"])
    imgs += [r["overlay"] for r in item.get("runs", ()) if r.get("overlay") is not None]
  return imgs


# ----------------------------------------------------------------------------------------------
# The page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1400px;padding:0 1.2em 3em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin:.8em 0 .3em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:1.6em}nav a{margin-right:1em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1em}
th,td{border:1px solid #ddd;padding:.25em .5em;white-space:nowrap}
thead th{background:#f3f3f3;position:sticky;top:0}tbody tr:nth-child(even){background:#fafafa}
.scroll{overflow-x:auto}figure{margin:1em 0}figure img{max-width:100%;height:auto;
border:1px solid #eee}figcaption,.caption{font-size:.9em;color:#444}
#gallery-controls{margin:.6em 0;display:flex;gap:1em;align-items:center;flex-wrap:wrap}
#gallery{display:flex;flex-wrap:wrap;gap:.8em}
.gallery-item{border:1px solid #ddd;border-radius:4px;padding:.4em;background:#fff}
.gallery-item .head{font-size:.85em;margin-bottom:.3em}
.gallery-item .panels{display:flex;gap:.3em}
.gallery-item .panel{text-align:center;font-size:.75em}
.gallery-item img{width:160px;height:160px;display:block}
"""

# Sorting and filtering the gallery: data-* attributes hold the class and each run's DICE.
_JS = """
(function(){
  var box=document.getElementById('gallery');
  if(!box) return;
  var items=Array.prototype.slice.call(box.querySelectorAll('.gallery-item'));
  var sortSel=document.getElementById('gallery-sort');
  var clsSel=document.getElementById('gallery-class');
  var count=document.getElementById('gallery-count');
  function num(el,key){var v=parseFloat(el.dataset[key]);return isNaN(v)?null:v;}
  function cmpDice(key,dir){return function(a,b){
    var x=num(a,key),y=num(b,key);
    if(x===null&&y===null) return a.dataset.index-b.dataset.index;
    if(x===null) return 1; if(y===null) return -1;
    return dir*(x-y)||(a.dataset.index-b.dataset.index);};}
  function update(){
    var v=sortSel.value,cmp;
    if(v==='class'){cmp=function(a,b){
      return a.dataset.cls.localeCompare(b.dataset.cls)||(a.dataset.index-b.dataset.index);};}
    else if(v==='index'){cmp=function(a,b){return a.dataset.index-b.dataset.index;};}
    else{var p=v.split(':');cmp=cmpDice('dice'+p[1],p[2]==='asc'?1:-1);}
    items.slice().sort(cmp).forEach(function(el){box.appendChild(el);});
    var c=clsSel.value,n=0;
    items.forEach(function(el){var show=(c===''||el.dataset.cls===c);
      el.style.display=show?'':'none';if(show)n++;});
    count.textContent=n+' of '+items.length+' images';
  }
  sortSel.addEventListener('change',update);
  clsSel.addEventListener('change',update);
  update();
})();
"""


def _fmt_dice(d) -> str:
  return "n/a" if d is None or (isinstance(d, float) and math.isnan(d)) else f"{float(d):.3f}"


def _gallery_html(gallery: Sequence[Mapping], images: _Images) -> str:
  labels: list[str] = []
  for item in gallery:
    for r in item.get("runs", ()):
      if r["label"] not in labels:
        labels.append(r["label"])
  classes = sorted({str(item.get("cls", item.get("class", ""))) for item in gallery})
  opts = ['<option value="class">class</option>', '<option value="index">original order</option>']
  for i, lb in enumerate(labels):
    e = html.escape(lb)
    opts.append(f'<option value="dice:{i}:desc">DICE {e}, high first</option>')
    opts.append(f'<option value="dice:{i}:asc">DICE {e}, low first</option>')
  cls_opts = ['<option value="">all classes</option>'] + [
    f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in classes
  ]
  cards = []
  for n, item in enumerate(gallery):
    cls = str(item.get("cls", item.get("class", "")))
    runs = {r["label"]: r for r in item.get("runs", ())}
    attrs = [f'data-index="{n}"', f'data-cls="{html.escape(cls)}"']
    panels = [
      f'<div class="panel"><img alt="ground truth" src="{images.src(item["image"])}">'
      "ground truth</div>"
    ]
    for i, lb in enumerate(labels):
      r = runs.get(lb)
      d = None if r is None else r.get("dice")
      ok = d is not None and not (isinstance(d, float) and math.isnan(d))
      attrs.append(f'data-dice{i}="{float(d)!r}"' if ok else f'data-dice{i}=""')
      if r is not None and r.get("overlay") is not None:
        panels.append(
          f'<div class="panel"><img alt="{html.escape(lb)}" src="{images.src(r["overlay"])}">'
          f"{html.escape(lb)} DICE {_fmt_dice(d)}</div>"
        )
    caption = html.escape(str(item.get("caption", "")))
    cards.append(
      f'<div class="gallery-item" {" ".join(attrs)}><div class="head"><b>'
      f"{html.escape(cls.replace('_', ' '))}</b> {caption}</div>"
      f'<div class="panels">{"".join(panels)}</div></div>'
    )
  return (
    '<div id="gallery-controls"><label>sort by <select id="gallery-sort">'
    + "".join(opts)
    + '</select></label><label>show <select id="gallery-class">'
    + "".join(cls_opts)
    + f'</select></label><span id="gallery-count">{len(gallery)} images</span></div>\n'
    + '<div id="gallery">\n'
    + "\n".join(cards)
    + "\n</div>"
  )


def write_report(
  out_dir,
  *,
  title: str,
  tables: Sequence[tuple[str, str]] = (),
  figures: Sequence[tuple[str, ImageData]] = (),
  gallery: Sequence[Mapping] = (),
  intro: str = "",
  embed: bool | str = "auto",
  filename: str = "index.html",
) -> epath.Path:
  """Writes out_dir/<filename> (default index.html) and returns its path.

  Args:
    title: the page's <title> and heading.
    tables: [(caption, Markdown or HTML)]; Markdown is what `lsemil.reporting.paper_tables`
      writes (pipe tables with **bold**, and text lines such as the bold rule, as paragraphs).
      Content starting with '<' is inserted as HTML.
    figures: [(caption, PNG path or bytes)], e.g. Figures 1 and 3, ROC curves, reliability
      diagrams.
    gallery: [GalleryItem]: {'image': PNG / JPEG (the image with its boxes), 'cls' (or 'class'):
      the box class, 'runs': [{'label', 'overlay': PNG, 'dice': float}], 'caption'?}; one
      card per item (see `gallery_item`).
    intro: Markdown shown under the title.
    embed: True embeds every image as a data URI (one file), False writes them under
      out_dir/index_files/ (a path already inside out_dir is linked where it is), 'auto'
      embeds when they total at most EMBED_LIMIT bytes.
  """
  out_dir = fileio.as_path(out_dir)
  if embed == "auto":
    embed = sum(_size(i) for i in _all_images(figures, gallery)) <= EMBED_LIMIT
  elif not isinstance(embed, bool):
    raise ValueError(f"embed must be True, False or 'auto', got {embed!r}")
  images = _Images(out_dir, embed)
  body = [f"<h1>{html.escape(title)}</h1>"]
  if intro:
    body.append(markdown_to_html(intro))
  nav = [
    ("tables", "Tables", tables),
    ("figures", "Figures", figures),
    ("gallery", "Gallery", gallery),
  ]
  links = "".join(f'<a href="#{i}-section">{t}</a>' for i, t, x in nav if x)
  body.append(f"<nav>{links}</nav>")
  if tables:
    body.append('<h2 id="tables-section">Tables</h2>')
    for caption, content in tables:
      body.append(f"<h3>{inline_html(caption)}</h3>")
      body.append(f'<div class="scroll">{_as_html(content)}</div>')
  if figures:
    body.append('<h2 id="figures-section">Figures</h2>')
    for caption, img in figures:
      body.append(
        f'<figure><img alt="{html.escape(caption)}" src="{images.src(img)}">'
        f"<figcaption>{inline_html(caption)}</figcaption></figure>"
      )
  if gallery:
    body.append('<h2 id="gallery-section">Gallery</h2>')
    body.append(
      '<p class="caption">Every test image with boxes: the ground truth (green boxes) and '
      "each run's saliency for the box's class with its DICE.</p>"
    )
    body.append(_gallery_html(gallery, images))
  page = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
    + "\n".join(body)
    + f"\n<script>{_JS}</script>\n</body>\n</html>\n"
  )
  return fileio.write_text(out_dir / filename, page)


# ----------------------------------------------------------------------------------------------
# Gallery entries


def gallery_item(
  image,
  boxes,
  finding: str,
  saliency: Mapping[str, np.ndarray],
  *,
  dice: Mapping[str, float] | None = None,
  source_size: float = ORIGINAL_SIZE,
  size: int = 160,
  format: str = "jpeg",
  caption: str = "",
) -> dict:
  """One gallery entry: thumbnails of the image with its `finding` boxes and of each run's
  (n, n) saliency map for that class, with DICE (given, or `overlap.box_dice` at 512 x 512
  with nearest upsampling, as Table 3). image: (H, W) grey; boxes: (x, y, w, h) in
  `source_size` pixels; saliency: {run label: map in [0, 1]}. Thumbnails are size x size
  `format` ('jpeg' or 'png') images (`plots.thumbnail`); the page shows them at 160 px.
  """
  dice = dict(dice or {})

  def thumb(sal):
    return plots.thumbnail(image, sal, boxes, source_size=source_size, size=size, format=format)

  runs = []
  for label, sal in saliency.items():
    d = dice.get(label)
    if d is None:
      d = overlap.box_dice(sal, boxes, size=512, source_size=source_size)
    runs.append(
      {
        "label": label,
        "overlay": thumb(sal),
        "dice": float(d),
      }
    )
  return {
    "image": thumb(None),
    "cls": finding,
    "runs": runs,
    "caption": caption,
  }
