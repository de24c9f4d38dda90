"""The report document: one content rendered as Markdown and as structured HTML."""

import os

import numpy as np
from PIL import Image

from drig.analysis import report_document


def _png(path, width, height):
  Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(path)
  return str(path)


def test_tables_lists_and_figures_render_as_html(tmp_path):
  report = report_document.Report("A report", str(tmp_path))
  report.heading("Scores", about="How well each map finds lesions.")
  report.table(["method", "score"], [("pixel IG", 0.5), ("a|b", 1)])
  report.markdown_block("| x | y |\n|---|---|\n| 1 | 2 |\n\n- one\n- two")
  wide = _png(tmp_path / "strip.png", 800, 100)
  square = _png(tmp_path / "square.png", 200, 200)
  report.heading("Figures")
  report.figure(wide, "a strip")
  report.figure(square, "a square")
  paths = report.write()
  page = open(paths["html"], encoding="utf-8").read()
  assert page.count("<table>") == 2 and "<li>one</li>" in page and "|---" not in page
  assert "<td>a|b</td>" in page  # A "|" in a cell stays in its cell.
  assert 'class="wide"' in page and page.count("<figure") == 2
  assert '<a href="#scores">Scores</a>' in page and 'id="scores"' in page
  assert "How well each map finds lesions." in page
  text = open(paths["markdown"], encoding="utf-8").read()
  assert "| a\\|b | 1 |" in text and "![a strip](strip.png)" in text
  assert "*How well each map finds lesions.*" in text


def test_repeated_headings_get_distinct_anchors(tmp_path):
  report = report_document.Report("r", str(tmp_path))
  report.heading("Grade 4")
  report.heading("Grade 4")
  page = report.html()
  assert 'id="grade-4"' in page and 'id="grade-4-2"' in page


def test_plural():
  assert report_document.plural(1, "image") == "1 image"
  assert report_document.plural(3, "image") == "3 images"
  assert report_document.plural(2, "unit") == "2 units"
  assert report_document.plural(0, "is", "are") == "0 are"


def test_png_size_reads_the_header_and_refuses_other_files(tmp_path):
  assert report_document.png_size(_png(tmp_path / "a.png", 30, 20)) == (30, 20)
  other = tmp_path / "b.txt"
  other.write_text("not a png")
  assert report_document.png_size(str(other)) is None
  assert report_document.png_size(os.path.join(tmp_path, "missing.png")) is None
