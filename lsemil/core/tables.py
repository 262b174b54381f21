"""Markdown and CSV tables: one writer for every table lsemil prints or writes."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], *, first_left=True) -> str:
  """A GitHub Markdown table: the first column left-aligned (or right), the others right."""
  lines = ["| " + " | ".join(header) + " |"]
  first = ":---" if first_left else "---:"
  lines.append("|" + "|".join([first] + ["---:"] * (len(header) - 1)) + "|")
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(header)
  w.writerows(rows)
  return buf.getvalue()
