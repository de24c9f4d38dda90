"""The report document: one content rendered as Markdown and as structured HTML."""

import html
import json
import os
import re
import types

import numpy as np
from PIL import Image
import pytest
from sklearn import metrics as sklearn_metrics

from configs import analyze as analyze_config
from drig.analysis import report_document
from drig.analysis import report_tables


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
  # Columns of numbers are right-aligned (their header too), text columns are not.
  assert '<td class="n">0.5</td>' in page and '<th class="n">score</th>' in page
  assert "<td>pixel IG</td>" in page and "<th>method</th>" in page
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


# The report's tables (drig.analysis.report_tables), from a fake run and fake shards: the
# numbers shown must be the ones the files hold.


class _Loaded:
  """What model_summary reads of a drig.analysis.model_source.LoadedModel."""

  def __init__(self, source, training_config=None, description=""):
    self.source, self.training_config, self.description = source, training_config, description


def _page(report):
  return report.html()


def _tables(page):
  """Each <table> of the page as rows of cell texts (header first)."""
  tables = []
  for table in re.findall(r"<table>(.*?)</table>", page, re.S):
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    tables.append([[html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                    for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
                   for row in rows])
  return tables


def _fake_run(tmp_path, final=None):
  run = tmp_path / "run"
  for step in (3, 7):
    os.makedirs(run / "checkpoints" / str(step))
  (run / "metrics.jsonl").write_text(
      json.dumps({"step": 3, "val/quadratic_kappa": 0.61}) + "\n"
      + json.dumps({"step": 7, "val/quadratic_kappa": 0.55}) + "\n")
  if final is not None:
    (run / "final_metrics.json").write_text(json.dumps(final))
  return str(run)


def _config(**fields):
  config = analyze_config.get_config("tiny")
  for key, value in fields.items():
    config[key] = value
  return config


def test_model_summary_shows_the_chosen_step_and_the_test_metrics_as_tables(tmp_path):
  confusion = [[5, 1, 0, 0, 0], [2, 3, 0, 0, 0], [0, 1, 4, 0, 0], [0, 0, 1, 2, 0],
               [0, 0, 0, 1, 3]]
  labels = np.repeat(np.arange(5), np.sum(confusion, axis=1))
  predictions = np.concatenate([np.repeat(np.arange(5), row) for row in confusion])
  # The independent reference: scikit-learn's kappa and recall of the same confusion.
  kappa = sklearn_metrics.cohen_kappa_score(labels, predictions, weights="quadratic")
  recall_1 = sklearn_metrics.recall_score(labels, predictions, labels=[1], average=None)[0]
  final = {"step": 7, "test_checkpoint": {"step": 3, "selection": "best",
                                          "why": "best validation kappa 0.6100"},
           "test": {"num_examples": int(len(labels)), "confusion_matrix": confusion,
                    "accuracy": float(np.mean(labels == predictions)),
                    "quadratic_kappa": float(kappa), "grade_1_recall": float(recall_1),
                    "auc_any_dr": 0.9},
           "test_confidence_intervals": {"confidence": 0.95, "intervals": {
               "quadratic_kappa": [0.5, 0.9], "accuracy": [0.6, 0.8],
               "grade_1_recall": [0.2, 0.9]}}}
  run = _fake_run(tmp_path, final)
  report = report_document.Report("r", str(tmp_path))
  metrics = {}
  report_tables.model_summary(_config(checkpoint=run), _Loaded(
      {"checkpoint": run, "step": 3}, {"data": {"name": "synthetic_fundus", "image_size": 80},
                                       "schedule": {"steps": [4, 3, 3]}, "batch_size": 8}),
      report, metrics)
  page = _page(report)
  assert '<h2 id="model">Model</h2>' in page and '<p class="about">' in page
  setting, test, matrix = _tables(page)
  cells = dict((row[0], row[1]) for row in setting[1:])
  assert cells["run (config.checkpoint)"] == run
  assert cells["restored step"] == ("3, config.checkpoint_step = 'best': best validation kappa "
                                    "0.6100")
  assert cells["validation kappa at that step"] == "0.6100"
  assert "10 of 8 images" in cells["training steps"] and "80 px" in cells["data set"]
  assert setting[0] == ["setting", "value"]
  assert test[0] == ["test metric", "value", "95% bootstrap interval"]
  rows = {row[0]: row[1:] for row in test[1:]}
  assert rows["quadratic weighted kappa"] == [f"{kappa:.4f}", "[0.5000, 0.9000]"]
  assert rows["grade-1 recall"] == [f"{recall_1:.4f}", "[0.2000, 0.9000]"]
  assert rows["AUROC, any DR"] == ["0.9000", "-"]
  assert matrix[0] == ["true \\ predicted", "0", "1", "2", "3", "4"]
  assert [[int(c) for c in row[1:]] for row in matrix[1:]] == confusion
  assert matrix[2][0] == "grade 1 (mild)"
  assert metrics["model_summary"]["validation_kappa"] == 0.61
  assert metrics["model_summary"]["test_step"] == 3


def test_model_summary_without_test_metrics_or_checkpoint_says_so(tmp_path):
  run = _fake_run(tmp_path)
  report = report_document.Report("r", str(tmp_path))
  report_tables.model_summary(_config(checkpoint=run, checkpoint_step="7"),
                              _Loaded({"checkpoint": run, "step": 7}, {}), report, {})
  text = report.markdown()
  assert "0.5500" in text and "No final_metrics.json in the run" in text
  report = report_document.Report("r", str(tmp_path))
  report_tables.model_summary(_config(), _Loaded({"init": "random", "path": ""}, None,
                                                 "config.init: random weights"), report, {})
  text = report.markdown()
  assert "Not a trained run" in text and "config.init: random weights" in text
  assert "| " not in text  # one line, no table


def _shard_data(n):
  rng = np.random.default_rng(0)
  probabilities = rng.dirichlet(np.ones(5), n).astype(np.float32)
  data = {"index": np.arange(n), "name": np.array([f"eye_{i}.png" for i in range(n)]),
          "label": np.array([2, -1] + [0] * (n - 2)), "probabilities": probabilities,
          "prediction": probabilities.argmax(1)}
  for q in ("predicted", "grade_0", "grade_4"):
    data[f"pixel_relative_gap.{q}"] = rng.uniform(0, 0.1, n)
    data[f"pixel_steps.{q}"] = np.full(n, 4)
  return data


def test_per_image_table_shows_each_image_and_counts_the_rest(tmp_path):
  data = _shard_data(7)
  report = report_document.Report("r", str(tmp_path))
  report_tables.per_image_table(_config(report_max_rows=5), data, report)
  page = _page(report)
  (table,) = _tables(page)
  header, rows = table[0], table[1:]
  assert header[:9] == ["#", "name", "true grade", "predicted", "P(0)", "P(1)", "P(2)", "P(3)",
                        "P(4)"]
  assert header[9:11] == ["predicted grade: gap", "predicted grade: steps"]
  assert len(rows) == 5 and rows[1][1] == "eye_1.png" and rows[1][2] == "unknown"
  for row, p, gap in zip(rows, data["probabilities"], data["pixel_relative_gap.predicted"]):
    assert [float(c) for c in row[4:9]] == pytest.approx(p, abs=5e-4)
    assert int(row[3]) == int(np.argmax(p)) and row[9] == f"{gap:.2%}"
  assert "2 more images not shown" in page


class _Images:
  """Images whose masks are given: what localization_tables reads."""

  def __init__(self, masks):
    self.masks = masks

  def read(self, index):
    return types.SimpleNamespace(masks=self.masks[index])


def test_localization_tables_give_chance_levels_and_drop_absent_lesions(tmp_path):
  fov = np.zeros((10, 10), bool)
  fov[:, :5] = True  # 50 pixels
  small = np.zeros((10, 10), bool)
  small[0, :2] = True  # 2 pixels in the field of view
  large = np.zeros((10, 10), bool)
  large[:2, :] = True  # 20 pixels, 10 of them in the field of view
  images = _Images([{"microaneurysms": small, "exudates": np.zeros_like(fov)},
                    {"microaneurysms": large, "exudates": np.zeros_like(fov)}])
  stats = {"mean": 0.5, "std": 0.1, "count": 2}
  none = {"mean": float("nan"), "std": float("nan"), "count": 0}
  metrics = ("pointing_game", "relevance_mass", "relevance_rank", "pixel_auroc")
  summary = {method: {"microaneurysms": {m: stats for m in metrics},
                      "exudates": {m: none for m in metrics}}
             for method in ("pixel_ig", "random")}
  report = report_document.Report("r", str(tmp_path))
  chance = report_tables.localization_tables(summary, {"index": np.arange(2)}, images, fov,
                                             report)
  page = _page(report)
  tables = _tables(page)
  assert len(tables) == 4 and "No analysed image has exudates" in page
  share = (2 / 50 + 10 / 50) / 2  # the mean share of the field of view
  for table, level in zip(tables, (f"{share:.3f}",) * 3 + ("0.500",)):
    assert table[0] == ["method", "microaneurysms"]  # no empty exudates column
    assert table[1:] == [["images with the lesion", "2"], ["chance", level],
                         ["pixel_ig", "0.500 ± 0.100"], ["random", "0.500 ± 0.100"]]
  assert chance["pointing_game"]["microaneurysms"] == pytest.approx(share)
  assert chance["relevance_mass"]["microaneurysms"] == pytest.approx(share)
  assert chance["relevance_rank"]["microaneurysms"] == pytest.approx(share)
  assert chance["pixel_auroc"]["microaneurysms"] == 0.5
  assert page.count('<p class="about">') == 4


def test_figure_links_its_vector_files(tmp_path):
  png = _png(tmp_path / "f.png", 100, 100)
  report = report_document.Report("r", str(tmp_path))
  report.figure(png, "a map", alternates=[str(tmp_path / "f.svg"), str(tmp_path / "f.pdf")])
  page = report.html()
  assert '<img src="f.png"' in page
  assert '<a href="f.svg">SVG</a>, <a href="f.pdf">PDF</a>' in page
  assert "*a map* [SVG](f.svg) [PDF](f.pdf)" in report.markdown()
