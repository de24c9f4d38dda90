"""The analysis report as a document: one content, written as Markdown and as HTML.

``Report`` collects headings, paragraphs, tables and figures once. ``write``
puts ``report.md`` and ``report.html`` in the workdir, each atomically. The
HTML is rendered from the same Markdown by the ``markdown`` library (tables
become real tables, lists real lists), with a table of contents, a sentence
under each section heading saying what it shows, and figures laid out by
shape: wide figures (strips, panels) take the full page width, others sit side
by side at a readable size; each links to its full-resolution file and to its
vector copies (SVG, PDF) where there are any.
"""

from __future__ import annotations

import html
import os
import re
import struct

import markdown

from drig import files

# Figures at least this much wider than tall span the page (Fig (a) panels, Hinton strips).
_WIDE_ASPECT = 1.6

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:auto;padding:0 16px;
     line-height:1.45;color:rgb(34,34,34)}
h1{margin-bottom:4px}
nav{background:rgb(244,244,244);padding:6px 14px;border-radius:4px;display:inline-block}
nav ul{margin:4px 0;padding-left:18px}
p.about{color:rgb(85,85,85);font-style:italic;margin-top:-6px}
div.table{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:8px 0;font-size:0.92em}
td,th{border:1px solid rgb(187,187,187);padding:3px 8px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right}
td.n{white-space:nowrap;font-variant-numeric:tabular-nums}
th{background:rgb(238,238,238)}
figure{margin:10px 6px;display:inline-block;vertical-align:top;max-width:820px}
figure img{max-width:100%;height:auto;border:1px solid rgb(221,221,221)}
figure.wide{display:block;max-width:100%}
figcaption{font-size:0.9em;color:rgb(51,51,51)}
figcaption .files{white-space:nowrap}
"""


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
  """``"1 image"``, ``"3 images"``: a count with its noun in the right number."""
  word = singular if count == 1 else (plural_form or singular + "s")
  return f"{count} {word}"


def _slug(text: str, taken: set) -> str:
  slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
  unique, suffix = slug, 2
  while unique in taken:
    unique, suffix = f"{slug}-{suffix}", suffix + 1
  taken.add(unique)
  return unique


def png_size(path: str) -> tuple[int, int] | None:
  """(width, height) from a PNG's header, or None for other or unreadable files."""
  try:
    with open(path, "rb") as f:
      header = f.read(24)
  except OSError:
    return None
  if len(header) < 24 or header[:8] != b"\x89PNG\r\n\x1a\n":
    return None
  return struct.unpack(">II", header[16:24])


def _suffix(path: str) -> str:
  """A file's format as a link text: "SVG" for figure.svg."""
  return os.path.splitext(path)[1].lstrip(".").upper() or "file"


_CELL = re.compile(r"(<t([hd])>)(.*?)(</t[hd]>)", re.S)
_ROW = re.compile(r"<tr>.*?</tr>", re.S)


def _is_number(text: str) -> bool:
  """Whether a cell holds numbers only ("0.5", "3.2%", "0.5 ± 0.1", "[0.5, 0.9]", "-")."""
  text = re.sub(r"\d[eE][-+]?\d", "0", html.unescape(text)).strip()
  return (not re.search(r"[^\W\d_]", text) and bool(re.search(r"\d", text))) or text in ("-", "–")


def _align_numbers(table: str) -> str:
  """Marks the cells of columns that hold only numbers (class "n": right-aligned, unbroken),
  so that digits line up and text columns read from the left."""
  rows = [[m.group(3) for m in _CELL.finditer(row) if m.group(2) == "d"]
          for row in _ROW.findall(table)]
  rows = [r for r in rows if r]
  width = max((len(r) for r in rows), default=0)
  numeric = {c for c in range(width)
             if all(c < len(r) and _is_number(r[c]) for r in rows)} if rows else set()

  def mark(row_match):
    column = iter(range(width + 1_000))
    return _CELL.sub(lambda m: (f"<t{m.group(2)} class=\"n\">" if next(column) in numeric
                                else m.group(1)) + m.group(3) + m.group(4), row_match.group(0))

  return _ROW.sub(mark, table)


def _markdown_cell(value) -> str:
  # A "|" inside a cell would end it; a newline would end the row.
  return str(value).replace("|", "\\|").replace("\n", " ")


class Report:
  """One report's content, rendered as Markdown and HTML by ``write``."""

  def __init__(self, title: str, workdir: str):
    self.workdir = workdir
    self.title = title
    self._blocks: list[tuple[str, object]] = []  # (kind, payload)

  def heading(self, text: str, level: int = 2, about: str | None = None):
    """A heading (level 2 is a section, listed in the contents); ``about``: one
    sentence saying what the section shows, printed under it."""
    self._blocks.append(("heading", (text, level)))
    if about:
      self._blocks.append(("about", about))

  def paragraph(self, text: str):
    """A paragraph; Markdown emphasis and code in it are rendered."""
    self._blocks.append(("markdown", text))

  def table(self, header, rows):
    """A table: ``header`` names the columns, each row holds one value per column."""
    lines = ["| " + " | ".join(_markdown_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in rows]
    self._blocks.append(("markdown", "\n".join(lines)))

  def markdown_block(self, text: str):
    """Markdown produced elsewhere (tables, lists), rendered as such in the HTML."""
    self._blocks.append(("markdown", text.rstrip()))

  def figure(self, path: str, caption: str, alternates=()):
    """An image file (linked relative to the workdir) with its caption; ``alternates``:
    the same figure in other formats (e.g. SVG, PDF), linked under it."""
    self._blocks.append(("figure", (path, caption.replace("\n", "; "), tuple(alternates))))

  def markdown(self) -> str:
    """The report as Markdown."""
    out = [f"# {self.title}", ""]
    for kind, payload in self._blocks:
      if kind == "heading":
        text, level = payload
        out += ["#" * level + " " + text, ""]
      elif kind == "about":
        out += [f"*{payload}*", ""]
      elif kind == "markdown":
        out += [payload, ""]
      else:
        path, caption, alternates = payload
        rel = os.path.relpath(path, self.workdir)
        links = "".join(f" [{_suffix(a)}]({os.path.relpath(a, self.workdir)})"
                        for a in alternates)
        out += [f"![{caption}]({rel})", "", f"*{caption}*{links}", ""]
    return "\n".join(out)

  def html(self) -> str:
    """The report as one HTML page (see the module docstring)."""
    converter = markdown.Markdown(extensions=["tables", "sane_lists"])
    taken: set = set()
    contents, body = [], []
    for kind, payload in self._blocks:
      if kind == "heading":
        text, level = payload
        anchor = _slug(text, taken)
        if level == 2:
          contents.append(f'<li><a href="#{anchor}">{html.escape(text)}</a></li>')
        body.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
      elif kind == "about":
        body.append(f'<p class="about">{html.escape(payload)}</p>')
      elif kind == "markdown":
        converted = converter.reset().convert(payload)
        # Wide tables scroll inside the page rather than running off its edge.
        converted = re.sub(r"<table>.*?</table>",
                           lambda m: f'<div class="table">{_align_numbers(m.group(0))}</div>',
                           converted, flags=re.S)
        body.append(converted)
      else:
        body.append(self._figure_html(*payload))
    nav = f"<nav><b>Contents</b><ul>{''.join(contents)}</ul></nav>" if contents else ""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{nav}\n" + "\n".join(body) + "\n</body></html>\n")

  def _figure_html(self, path: str, caption: str, alternates=()) -> str:
    rel = html.escape(os.path.relpath(path, self.workdir))
    size = png_size(path)
    wide = size is not None and size[0] >= _WIDE_ASPECT * size[1]
    width = f' width="{size[0]}"' if size else ""
    links = ", ".join(f'<a href="{html.escape(os.path.relpath(a, self.workdir))}">'
                      f"{_suffix(a)}</a>" for a in alternates)
    files_html = f' <span class="files">({links})</span>' if links else ""
    return (f'<figure class="{"wide" if wide else "figure"}"><a href="{rel}">'
            f'<img src="{rel}"{width} alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}{files_html}</figcaption></figure>")

  def write(self) -> dict:
    """Writes report.md and report.html in the workdir; returns their paths."""
    md_path = os.path.join(self.workdir, "report.md")
    html_path = os.path.join(self.workdir, "report.html")
    files.atomic_write_text(md_path, self.markdown() + "\n")
    files.atomic_write_text(html_path, self.html())
    return {"markdown": md_path, "html": html_path}
