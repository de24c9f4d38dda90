"""The analysis report as a document: Markdown and HTML built side by side.

``Report`` collects headings, paragraphs, tables and figures once and writes
both ``report.md`` and ``report.html`` (figures as thumbnails linking to the
PNG files) into the workdir, each atomically.
"""

import html
import os

from drig.analysis import files


class Report:
  """Markdown and HTML built side by side from headings, paragraphs, tables and figures."""

  def __init__(self, title: str, workdir: str):
    self.workdir = workdir
    self.markdown = [f"# {title}", ""]
    self.html = [f"<h1>{html.escape(title)}</h1>"]

  def heading(self, text: str, level: int = 2):
    """A heading; level 2 is a section."""
    self.markdown += ["#" * level + " " + text, ""]
    self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

  def paragraph(self, text: str):
    """A paragraph of plain text."""
    self.markdown += [text, ""]
    self.html.append(f"<p>{html.escape(text)}</p>")

  def table(self, header, rows):
    """A table: ``header`` names the columns, each row holds one value per column."""
    self.markdown.append("| " + " | ".join(map(str, header)) + " |")
    self.markdown.append("|" + "---|" * len(header))
    for row in rows:
      self.markdown.append("| " + " | ".join(map(str, row)) + " |")
    self.markdown.append("")
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    self.html.append(f"<table><tr>{cells}</tr>{body}</table>")

  def markdown_block(self, text: str):
    """Markdown produced elsewhere (e.g. a table); shown preformatted in the HTML."""
    self.markdown += [text.rstrip(), ""]
    self.html.append(f"<pre>{html.escape(text)}</pre>")

  def figure(self, path: str, caption: str):
    """An image file (linked relative to the workdir) with its caption."""
    caption = caption.replace("\n", "; ")
    rel = os.path.relpath(path, self.workdir)
    self.markdown += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    self.html.append(f'<figure><a href="{html.escape(rel)}"><img src="{html.escape(rel)}" '
                     f'width="320"></a><figcaption>{html.escape(caption)}</figcaption></figure>')

  def write(self) -> dict:
    """Writes report.md and report.html in the workdir; returns their paths."""
    md_path = os.path.join(self.workdir, "report.md")
    html_path = os.path.join(self.workdir, "report.html")
    files.atomic_write_text(md_path, "\n".join(self.markdown) + "\n")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #999999;padding:2px 6px}"
             "figure{display:inline-block;margin:6px}figcaption{max-width:320px;font-size:small}")
    document = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>drig analysis</title>"
                f"<style>{style}</style></head><body>" + "\n".join(self.html) + "</body></html>\n")
    files.atomic_write_text(html_path, document)
    return {"markdown": md_path, "html": html_path}
