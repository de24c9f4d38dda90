"""The batch analysis job (drig.analysis.job) and binary on tiny synthetic data, tiny model."""

import collections
import glob
import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import helpers  # tests/helpers.py

from configs import analyze as analyze_config
from configs import base as base_config
from drig import attribution
from drig import grading
from drig import parallel
from drig.analysis import attributor
from drig.analysis import errors
from drig.analysis import images as images_lib
from drig.analysis import job
from drig.analysis import model_source
from drig.analysis import quantity_specs
from drig.analysis import report as report_lib
from drig.analysis import report_document
from drig.analysis import shards as shards_lib
from drig.analysis import validation
from drig.attribution import integration
from drig.data import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Tiny data set and a training workdir (config.json + one random-weight checkpoint)."""
  root = tmp_path_factory.mktemp("analyze")
  train_dir = helpers.write_tiny_analysis_run(root)
  data_dir = str(root / "tfds")
  return {"root": root, "data_dir": data_dir, "train_dir": str(train_dir)}


def _config(setup, **overrides):
  config = analyze_config.get_config("tiny")
  config.checkpoint = setup["train_dir"]
  return helpers.apply_overrides(config, overrides)


def _shard_arrays(workdir):
  return [dict(np.load(p)) for p in sorted(glob.glob(os.path.join(workdir, "shards", "*.npz")))]


def _assert_shards_equal(a, b):
  assert len(a) == len(b) and a
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _assert_not_uniform(path):
  pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
  assert pixels.shape[0] > 100 and pixels.shape[1] > 100, path
  assert pixels.std() > 5, f"{path} looks blank"
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, f"{path} has too few colours"


@pytest.fixture(scope="module")
def finished(setup):
  """One uninterrupted run of the tiny config."""
  workdir = str(setup["root"] / "uninterrupted")
  result = job.run_analysis(_config(setup), workdir)
  return workdir, result


def test_shards_have_the_documented_keys_and_shapes(finished):
  workdir, result = finished
  shards = _shard_arrays(workdir)
  assert len(shards) == 3 and len(result.shards_written) == 3  # 6 images, shards of 2
  n = [len(s["index"]) for s in shards]
  assert n == [2, 2, 2]
  np.testing.assert_array_equal(np.concatenate([s["index"] for s in shards]), np.arange(6))
  s = shards[0]
  channels = s["layer_channels.predicted"].shape[1]
  for q in ("predicted", "grade_0", "grade_4"):
    assert s[f"pixel_ig.{q}"].shape == (2, 80, 80, 3) and s[f"pixel_ig.{q}"].dtype == np.float16
    assert s[f"pixel_ig.{q}.scale"].shape == (2,)
    assert s[f"gradient.{q}"].shape == (2, 80, 80, 3)
    assert s[f"positive_resultant.{q}"].shape == (2, 80, 80)
    assert s[f"negative_resultant.{q}"].shape == (2, 80, 80)
    assert s[f"top_positive.{q}"].shape == (2, 4) and s[f"top_negative.{q}"].shape == (2, 4)
    assert s[f"layer_channels.{q}"].shape == (2, channels)
    # The study's unit types integrate the localisation quantity's 2k read-outs one by one.
    assert s[f"region_gaps.{q}"].shape == (2, 8 if q == "predicted" else 2)
    # Units (the default neurons): distinct flat indices, most positive (negative) first.
    for sign, order in (("positive", -1), ("negative", 1)):
      units, scores = s[f"top_{sign}.{q}"], s[f"top_{sign}_scores.{q}"]
      assert (units >= 0).all() and all(len(set(row)) == 4 for row in units)
      assert (np.diff(scores, axis=1) * order >= 0).all()
    assert (s[f"top_positive_scores.{q}"][:, 0] >= s[f"top_negative_scores.{q}"][:, 0]).all()
  probabilities = s["probabilities"]
  np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
  np.testing.assert_array_equal(s["prediction"], probabilities.argmax(1))
  # The predicted quantity is each image's own grade: equal to grade:K where K is predicted.
  for i, grade in enumerate(s["prediction"]):
    if grade in (0, 4):
      np.testing.assert_allclose(shards_lib.decode_map(s, "pixel_ig.predicted")[i],
                                 shards_lib.decode_map(s, f"pixel_ig.grade_{grade}")[i],
                                 rtol=1e-3, atol=1e-3 * np.abs(s["pixel_ig.predicted.scale"][i]))
  # The tiny config's methods: saliency (|gradient|, unsigned) is scored as it is; the
  # signed ones by their positive part and their absolute value.
  assert list(s["localization_methods"]) == [
      "pixel_ig", "active_regions", "gradient", "saliency", "input_x_gradient",
      "input_x_gradient (absolute)", "smoothgrad", "smoothgrad (absolute)", "random"]
  assert s["localization.predicted"].shape == (2, 9, len(s["localization_lesions"]), 3)


def test_report_figures_and_metrics(finished):
  workdir, result = finished
  assert result.num_images == 6 and not result.skipped
  assert os.path.exists(result.report["markdown"]) and os.path.exists(result.report["html"])
  metrics = json.loads(open(result.report["metrics"], encoding="utf-8").read())
  assert metrics["num_images"] == 6
  assert "localization" in metrics and "pixel_ig" in metrics["localization"]
  assert len(metrics["randomisation_rank_correlation"]) == 1
  # The tiny config's cascade: 3 stages from the logits to the stem, both methods, 1 image.
  cascade = metrics["randomisation_cascade"]
  assert cascade["layers"][0] == "logits" and cascade["layers"][-1] == "base/Conv2d_1a_3x3"
  assert len(cascade["layers"]) == 3 and cascade["images"] == 1
  assert set(cascade["maps"]) == {"integrated_gradients", "saliency"}
  assert all(len(m["per_image"]) == 3 and len(m["per_image"][0]) == 1
             for m in cascade["maps"].values())
  assert "cascading_randomisation.png" in {os.path.basename(p) for p in result.figures}
  assert "Cascading randomisation" in open(result.report["markdown"], encoding="utf-8").read()
  assert "linearity" in metrics
  names = {os.path.basename(p) for p in result.figures}
  assert {"fig_a_000.png", "fig_a_001.png", "fig_b.png", "linearity_fc1.png"} <= names
  for path in result.figures:
    _assert_not_uniform(path)
  markdown = open(result.report["markdown"], encoding="utf-8").read()
  for path in result.figures:
    assert os.path.relpath(path, workdir) in markdown



def test_report_html_is_structured(finished):
  workdir, result = finished
  page = open(result.report["html"], encoding="utf-8").read()
  parser = HtmlStructure()
  parser.feed(page)
  # Tables are real tables: no Markdown table syntax survives in the page's text.
  assert parser.tags["table"] >= 2
  assert not re.search(r"^\s*\|.*\|\s*$", parser.text, re.M)
  assert "|---" not in parser.text
  # Every figure shown exists, and every figure written is shown.
  sources = {os.path.normpath(os.path.join(workdir, s)) for s in parser.images}
  assert sources and all(os.path.exists(s) for s in sources)
  assert {os.path.normpath(p) for p in result.figures} <= sources
  # A contents list whose links reach the section headings.
  assert parser.links_to_anchors and set(parser.links_to_anchors) <= parser.ids
  # "1 images" is a count left unpluralised; "grade-1 images" is a grade.
  assert not re.search(r"(?<![-\w])1 images\b", parser.text)
  # The model summary and the per-image table are tables; one sentence under every section.
  sections = dict(re.findall(r'<h2 id="([^"]+)">.*?</h2>(.*?)(?=<h2 |</body>)', page, re.S))
  assert list(sections)[:2] == ["model", "analysis"] and "images" in sections
  assert "<table>" in sections["model"] and "final_metrics.json" in sections["model"]
  rows = re.findall(r"<tr>", sections["images"].split("</table>")[0])
  assert len(rows) == 1 + result.num_images  # the header and one row per image
  assert all(body.lstrip().startswith('<p class="about">') for body in sections.values())
  assert "'poster' palette" in sections["analysis"]
  assert "<td>chance</td>" in sections["lesion-localisation"]
  # The tiny config runs the lesion study: its tables and a figure per score.
  assert "<table>" in sections["lesion-study"] and "study_pointing_game.png" in sections[
      "lesion-study"]

def test_analysis_writes_its_scalars_and_figures_to_tensorboard(setup, finished):
  workdir, result = finished
  events = helpers.tensorboard_events(os.path.join(workdir, "tensorboard"))
  step = 3  # the fake training run's only checkpoint
  accuracy = events.Scalars("analysis/accuracy")
  assert [e.step for e in accuracy] == [step]
  assert accuracy[0].value == pytest.approx(result.metrics["accuracy"])
  assert events.Scalars("analysis/num_images")[0].value == result.num_images
  gaps = result.metrics["pixel_relative_gap.predicted"]
  assert events.Scalars("analysis/pixel_relative_gap.predicted/median")[0].value == (
      pytest.approx(gaps["median"]))
  pngs = [p for p in result.figures if p.endswith(".png")]
  assert pngs
  for path in pngs:
    name = os.path.splitext(os.path.relpath(path, os.path.join(workdir, "figures")))[0]
    (event,) = events.Images(f"figures/{name}")
    assert helpers.decode_image_event(event).shape[:2] == np.asarray(Image.open(path)).shape[:2]


def test_rerun_skips_everything_and_changed_config_errors(setup, finished):
  workdir, first = finished
  outputs = first.shards + first.figures + list(first.report.values())
  before = {p: os.stat(p).st_mtime_ns for p in outputs}
  again = job.run_analysis(_config(setup), workdir)
  assert again.shards_written == []
  assert {p: os.stat(p).st_mtime_ns for p in outputs} == before
  assert again.figures == first.figures and again.num_images == 6
  with pytest.raises(errors.ConfigMismatchError, match=r"steps: 4 -> 5"):
    job.run_analysis(_config(setup, steps=5), workdir)


def test_missing_checkpoint_is_named(setup, tmp_path):
  with pytest.raises(errors.AnalysisError, match="nowhere.*config.json"):
    job.run_analysis(_config(setup, checkpoint=str(tmp_path / "nowhere")), str(tmp_path / "w"))
  with pytest.raises(errors.AnalysisError, match="unknown quantity"):
    job.run_analysis(_config(setup, quantities=("grade:7",)), str(tmp_path / "w2"))
  with pytest.raises(errors.AnalysisError, match=r"config\.neurons='neuron' is not allowed"):
    job.run_analysis(_config(setup, neurons="neuron"), str(tmp_path / "w3"))


def test_bad_value_leaves_the_workdir_to_the_corrected_command(setup, finished, tmp_path):
  # finished compiled the same shapes: the corrected run reuses its programs.
  cheap = {"num_images": 2, "randomisation.num_images": 0, "linearity.num_images": 0,
           "counterfactuals.max_images": 0, "figures.num_images": 1}
  workdir = tmp_path / "corrected"
  started = time.perf_counter()
  with pytest.raises(errors.AnalysisError, match=r"config\.top_k=-3 is not allowed"):
    job.run_analysis(_config(setup, top_k=-3, **cheap), str(workdir))
  assert time.perf_counter() - started < 10  # refused before any compilation
  assert not workdir.exists()
  result = job.run_analysis(_config(setup, **cheap), str(workdir))
  assert result.num_images == 2 and len(result.shards_written) == 1
  workdir_finished, _ = finished
  _assert_shards_equal(_shard_arrays(workdir), _shard_arrays(workdir_finished)[:1])


def test_damaged_shards_are_moved_aside_and_redone_with_equal_outputs(setup, finished,
                                                                      tmp_path, caplog):
  workdir, first = finished
  copy = tmp_path / "damaged"
  shutil.copytree(workdir, copy)
  # Shard 1 cut in half (seen at the start); shard 2 damaged inside a map (its zip index
  # is intact, so only reading it shows it) with the report to redo.
  truncated = copy / "shards" / "shard-00001.npz"
  half = truncated.read_bytes()[:truncated.stat().st_size // 2]
  truncated.write_bytes(half)
  inside = copy / "shards" / "shard-00002.npz"
  data = bytearray(inside.read_bytes())
  with zipfile.ZipFile(inside) as archive:
    info = archive.getinfo("pixel_ig.predicted.npy")
  middle = info.header_offset + 100 + info.compress_size // 2
  data[middle:middle + 64] = bytes(64)
  inside.write_bytes(bytes(data))
  os.remove(copy / "metrics.json")
  with caplog.at_level("WARNING"):
    with pytest.raises(errors.AnalysisError, match=f"shard file {inside} cannot be read"):
      job.run_analysis(_config(setup), str(copy))
  warnings = [r.getMessage() for r in caplog.records if "damaged shard" in r.getMessage()]
  assert len(warnings) == 1 and str(truncated) in warnings[0] and "BadZipFile" in warnings[0]
  aside = sorted(glob.glob(str(copy / "shards" / "*.damaged-*")))
  assert [os.path.basename(p).split(".damaged-")[0] for p in aside] == [
      "shard-00001.npz", "shard-00002.npz"]
  assert open(aside[0], "rb").read() == half  # kept, not deleted
  assert not inside.exists()
  again = job.run_analysis(_config(setup), str(copy))
  assert again.shards_written == [str(inside)]
  _assert_shards_equal(_shard_arrays(copy), _shard_arrays(workdir))
  assert (json.loads((copy / "metrics.json").read_text())
          == json.loads(open(first.report["metrics"], encoding="utf-8").read()))


def test_corrupt_photograph_is_skipped_and_reported(setup, tmp_path):
  photos = tmp_path / "photos"
  photos.mkdir()
  builder = datasets.load_builder_from_config(_data_config(setup), prepare=False)
  source = builder.as_data_source("test")
  for i in range(2):
    Image.fromarray(np.asarray(source[i]["photo"])).save(photos / f"eye_{i}.png")
  (photos / "eye_9.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  config = _config(setup, **{"data.files": str(photos / "*"), "data.image_size": 80,
                             "figures.num_images": 1, "randomisation.num_images": 0,
                             "linearity.num_images": 0, "neurons": "channel"})
  result = job.run_analysis(config, str(tmp_path / "files"))
  assert result.num_images == 2
  assert [s["name"] for s in result.skipped] == ["eye_9.jpg"]
  assert result.skipped[0]["reason"]
  skipped = json.loads((tmp_path / "files" / "skipped.json").read_text())
  assert skipped == result.skipped
  assert "eye_9.jpg" in (tmp_path / "files" / "report.md").read_text()
  assert "top 4 channels of each sign" in (tmp_path / "files" / "report.md").read_text()
  # With channels as the neurons, the stored top channels are the extreme layer attributions.
  for shard in _shard_arrays(str(tmp_path / "files")):
    for q in ("predicted", "grade_0", "grade_4"):
      order = np.argsort(-shard[f"layer_channels.{q}"], axis=1, kind="stable")[:, :4]
      np.testing.assert_array_equal(np.sort(shard[f"top_positive.{q}"], 1), np.sort(order, 1))
      order = np.argsort(shard[f"layer_channels.{q}"], axis=1, kind="stable")[:, :4]
      np.testing.assert_array_equal(np.sort(shard[f"top_negative.{q}"], 1), np.sort(order, 1))


def _data_config(setup):
  config = base_config.get_config("tiny")
  config.data.data_dir = setup["data_dir"]
  return config.data


def _command(setup, workdir):
  # The same shards as the `finished` fixture; host 0's experiments off (they do not
  # change the shards, and each costs compilations).
  return [sys.executable, "-m", "drig.analyze", "--config=configs/analyze.py:tiny",
          f"--workdir={workdir}", f"--config.checkpoint={setup['train_dir']}",
          "--config.randomisation.num_images=0", "--config.linearity.num_images=0",
          "--config.counterfactuals.max_images=0"]


def _env(setup):
  return helpers.subprocess_env(setup["root"] / "jax_cache")


def test_binary_resumes_after_sigkill_with_equal_outputs(setup, finished, tmp_path):
  killed = tmp_path / "killed"
  process = subprocess.Popen(_command(setup, killed), cwd=ROOT, env=_env(setup),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  first_shard = killed / "shards" / "shard-00000.npz"
  deadline = time.time() + 300
  while not first_shard.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  if not first_shard.exists():
    process.kill()
    pytest.fail("no shard written: " + process.stderr.read().decode()[-3000:])
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  assert not (killed / "shards" / "shard-00002.npz").exists()  # killed mid-job
  assert not (killed / "report.md").exists()
  resumed = subprocess.run(_command(setup, killed), cwd=ROOT, env=_env(setup),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Report:" in resumed.stdout and "Figure:" in resumed.stdout
  assert "0 to do" not in resumed.stderr and "owns 3, " in resumed.stderr
  workdir, _ = finished
  _assert_shards_equal(_shard_arrays(killed), _shard_arrays(workdir))
  assert json.loads((killed / "skipped.json").read_text()) == []
  # A shard cut in half is named in one line, moved aside and attributed again by the binary.
  damaged = killed / "shards" / "shard-00001.npz"
  damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
  repaired = subprocess.run(_command(setup, killed), cwd=ROOT, env=_env(setup),
                            capture_output=True, text=True, timeout=600)
  assert repaired.returncode == 0, repaired.stderr[-3000:]
  assert "Traceback" not in repaired.stderr
  reports = [line for line in repaired.stderr.splitlines() if "damaged shard" in line]
  assert len(reports) == 1 and str(damaged) in reports[0], repaired.stderr[-3000:]
  assert len(glob.glob(str(damaged) + ".damaged-*")) == 1
  _assert_shards_equal(_shard_arrays(killed), _shard_arrays(workdir))
  # A typo in an override is an error (the config is locked).
  typo = subprocess.run(_command(setup, tmp_path / "typo") + ["--config.stpes=3"], cwd=ROOT,
                        env=_env(setup), capture_output=True, text=True, timeout=300)
  assert typo.returncode != 0 and "stpes" in typo.stderr


def test_per_image_grade_reads_each_images_grade_at_any_points_per_image():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(4, 5)).astype(np.float32))
  logits_fn = jax.tree_util.Partial(lambda w, x: x @ w, w)
  predictions = np.array([4, 0, 2])
  quantity = quantity_specs.PerImageGrade(logits_fn, jax.nn.one_hot(predictions, 5))
  x = jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))
  probabilities = np.asarray(jax.nn.softmax(x @ w))
  expected = probabilities[np.arange(3), predictions]
  np.testing.assert_allclose(quantity(x), expected, rtol=1e-6)
  # Image-major path points, 2 per image: [6] rows are images 0, 0, 1, 1, 2, 2.
  np.testing.assert_allclose(quantity(jnp.repeat(x, 2, axis=0)), np.repeat(expected, 2),
                             rtol=1e-6)
  with pytest.raises(errors.AnalysisError, match="a batch of 4 rows for 3 images"):
    quantity(x[:1].repeat(4, axis=0))
  # Pixel IG with 2 points per call (once ambiguous with [inputs; baselines]) matches each
  # image's own grade quantity integrated alone.
  baseline = attribution.half_gray_baseline(x)
  together, gap = attribution.integrated_gradients(quantity, x, baseline, steps=4,
                                                   chunk_size=2)
  for n, grade in enumerate(predictions):
    alone, alone_gap = attribution.integrated_gradients(
        attribution.probability_of_grade(logits_fn, int(grade)), x[n:n + 1], baseline,
        steps=4, chunk_size=2)
    np.testing.assert_allclose(together[n:n + 1], alone, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gap[n:n + 1], alone_gap, rtol=1e-5, atol=1e-7)
  # The job splits each call's images into parts when a call has one point per image:
  # each image still reads its own grade.
  split = quantity_specs.PerImageGrade(integration.BatchGroups(logits_fn, 2),
                                       jax.nn.one_hot(predictions, 5))
  parts, parts_gap = attribution.integrated_gradients(split, x, baseline, steps=4, chunk_size=1)
  whole, whole_gap = attribution.integrated_gradients(quantity, x, baseline, steps=4,
                                                      chunk_size=1)
  np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(parts_gap, whole_gap, rtol=1e-5, atol=1e-7)
  # Error-controlled IG mixes images in one call (3 points per call here): each image
  # still reads its own grade, so its IG sums to its own grade's change and matches a
  # fine fixed-step IG of that grade alone.
  auto = attribution.integrated_gradients(quantity, x, baseline, steps="auto", tolerance=1e-3,
                                          max_steps=256, chunk_size=3)
  assert np.asarray(auto.converged).all()
  for n, grade in enumerate(predictions):
    own = attribution.probability_of_grade(logits_fn, int(grade))
    change = float(own(x[n:n + 1])[0] - own(jnp.broadcast_to(baseline, x[n:n + 1].shape))[0])
    assert abs(float(np.sum(auto.attributions[n])) - change) <= 1e-3 * abs(change) + 1e-7
    fine, _ = attribution.integrated_gradients(own, x[n:n + 1], baseline, steps=512)
    np.testing.assert_allclose(auto.attributions[n:n + 1], fine, rtol=0,
                               atol=2e-3 * np.abs(fine).sum())


def test_batch_groups_only_where_the_path_cannot_be_split(monkeypatch):
  monkeypatch.setattr(integration, "default_groups_per_call", lambda: 2)  # a CPU
  assert attributor.batch_groups(0, chunk=1, num_images=16, num_devices=1) == 2
  assert attributor.batch_groups(0, chunk=1, num_images=4, num_devices=1) == 2
  assert attributor.batch_groups(0, chunk=1, num_images=3, num_devices=1) == 1  # parts of 1 image
  assert attributor.batch_groups(0, chunk=2, num_images=16, num_devices=1) == 1  # path groups do it
  assert attributor.batch_groups(0, chunk=1, num_images=16, num_devices=8) == 1  # sharded batch
  assert attributor.batch_groups(3, chunk=4, num_images=16, num_devices=8) == 3  # the config's
  monkeypatch.setattr(integration, "default_groups_per_call", lambda: 1)  # an accelerator
  assert attributor.batch_groups(0, chunk=1, num_images=16, num_devices=1) == 1


class HtmlStructure(html.parser.HTMLParser):
  """Counts tags, collects image sources, element ids, in-page links and visible text."""

  def __init__(self):
    super().__init__()
    self.tags = collections.Counter()
    self.images, self.links_to_anchors, self.ids, self.chunks = [], [], set(), []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags[tag] += 1
    if tag == "img":
      self.images.append(attrs["src"])
    if tag == "a" and attrs.get("href", "").startswith("#"):
      self.links_to_anchors.append(attrs["href"][1:])
    if "id" in attrs:
      self.ids.add(attrs["id"])

  def handle_data(self, data):
    self.chunks.append(data)

  @property
  def text(self):
    return "".join(self.chunks)


def test_linearity_and_counterfactual_sections_report_what_they_measure(finished):
  workdir, result = finished
  linearity_metrics = result.metrics["linearity"]
  assert linearity_metrics["quantity"] == "logit" and linearity_metrics["threshold"] == 0.9
  cs = np.asarray(linearity_metrics["cs"])
  # Unclipped, the input moves exactly c ||dq/dx||: the achieved distance is linear in c.
  distance = np.asarray(linearity_metrics["distance"])
  np.testing.assert_allclose(distance / cs, distance[0] / cs[0], rtol=1e-3)
  for layer, summary in linearity_metrics["layers"].items():
    assert summary["active_series"] + summary["inactive_series"] == summary["series"], layer
    assert summary["linear_series"] <= summary["active_series"]
    # Inactive units are counted apart and never special.
    assert not set(summary["inactive_units"]) & set(summary["special_units"])
    assert len(summary["average_gradient_drift"]) == len(cs)
    assert summary["average_gradient_drift"][0] in (0.0, None)
  counterfactual_metrics = result.metrics["counterfactuals"]
  assert counterfactual_metrics["budget"] == "l2"
  assert {"towards_grade_1", "towards_grade_0"} <= set(counterfactual_metrics)
  for direction in ("towards_grade_1", "towards_grade_0"):
    found = counterfactual_metrics[direction]
    if found["num_images"]:
      assert len(found["original_quantity"]) == found["num_images"]
      assert set(found["first_flip"]) == {"ig", "gradient", "gradient_support"}
      assert len(found["flip_rate"]) == 3 * len(analyze_config.get_config("tiny")
                                                .counterfactuals.cs)
  markdown = open(result.report["markdown"], encoding="utf-8").read()
  assert "Quantity: the logit of grade" in markdown and "as measured" in markdown
  assert "Budget mode 'l2'" in markdown and "first flip" in markdown


@pytest.mark.parametrize("field, value", [
    ("linearity.quantity", "softmax"), ("linearity.threshold", 1.5),
    ("counterfactuals.quantity", "odds"), ("figures.formats", ("png", "jpg")),
    ("figures.formats", ()), ("palette", "rainbow"), ("report_max_rows", 0)])
def test_experiment_settings_are_validated(setup, field, value):
  with pytest.raises(errors.AnalysisError, match=field.replace(".", r"\.")):
    validation.validate_config(_config(setup, **{field: value}))


def test_method_maps_are_stored_reported_and_consistent(finished):
  workdir, result = finished
  config = analyze_config.get_config("tiny")
  extra = [m for m in config.methods if m != "integrated_gradients"]
  assert extra  # the tiny config computes a few cheap methods beside pixel IG
  s = _shard_arrays(workdir)[0]
  for q in ("predicted", "grade_0", "grade_4"):
    for m in extra:
      assert s[f"map.{m}.{q}"].shape == (2, 80, 80, 3) and s[f"map.{m}.{q}.scale"].shape == (2,)
    # Captum's Saliency is |gradient|: equal to the job's own gradient map, computed apart.
    gradient = shards_lib.decode_map(s, f"gradient.{q}")
    saliency = shards_lib.decode_map(s, f"map.saliency.{q}")
    np.testing.assert_allclose(saliency, np.abs(gradient),
                               atol=2e-3 * np.abs(gradient).max())
  assert shards_lib.expected_keys(["predicted"], config.methods)[-1] == (
      f"map.{extra[-1]}.predicted.scale")
  metrics = result.metrics
  assert metrics["baseline"] == "half_gray" and metrics["methods"] == list(config.methods)
  assert set(extra) <= set(metrics["localization"])
  markdown = open(result.report["markdown"], encoding="utf-8").read()
  assert "from the half_gray baseline" in markdown and "Attribution methods" in markdown
  assert {"methods_000.png", "methods_001.png"} <= {os.path.basename(p) for p in result.figures}


@pytest.mark.parametrize("field,value,message", [
    ("methods", ("integrated_gradients", "smoothgrads"), "'smoothgrads' is not one"),
    ("methods", ("saliency", "saliency"), "each method once"),
    ("methods", (), "a non-empty list"),
    ("baseline", "gray", "unknown baseline 'gray'"),
    ("baseline", "blurred:0", "sigma must be a number of pixels > 0"),
])
def test_bad_methods_and_baselines_are_named(setup, field, value, message):
  config = _config(setup, **{field: value})
  with pytest.raises(errors.AnalysisError, match=f"config.{field}=.*{message}"):
    validation.validate_config(config)


def test_named_baselines_are_valid_and_attribution_keys_follow_the_images(setup):
  for name in ("half_gray", "black", "blurred", "blurred:3.5", "uniform_noise"):
    validation.validate_config(_config(setup, baseline=name))
  first = attributor.attribution_key(0, np.array([4, 5, -1]))
  np.testing.assert_array_equal(first, attributor.attribution_key(0, np.array([4, 7])))
  assert not np.array_equal(first, attributor.attribution_key(0, np.array([6, 7])))
  assert not np.array_equal(first, attributor.attribution_key(1, np.array([4, 5])))


def test_configured_baseline_is_resolved_per_batch(setup):
  """The baseline every method of a shard integrates from (the job runs the half-gray one)."""
  x = grading.to_model_input(
      np.random.default_rng(5).integers(0, 256, (2, 80, 80, 3), dtype=np.uint8))
  key = attributor.attribution_key(0, np.arange(2))
  baselines = {}
  for name in ("half_gray", "black", "blurred:2", "uniform_noise"):
    config = _config(setup, baseline=name)
    loaded = model_source.load_model(config)
    shard = attributor.ShardAttributor(config, loaded, parallel.local_mesh())
    baselines[name] = np.asarray(shard._baseline(jnp.asarray(x), key))  # pylint: disable=protected-access
  np.testing.assert_allclose(baselines["half_gray"], attribution.half_gray_baseline(x))
  np.testing.assert_array_equal(baselines["black"], np.full((1, 80, 80, 3), -1.0, np.float32))
  np.testing.assert_allclose(baselines["blurred:2"], attribution.gaussian_blur(x, 2.0))
  assert baselines["uniform_noise"].shape == x.shape
  assert -1 <= baselines["uniform_noise"].min() and baselines["uniform_noise"].max() <= 1


@pytest.mark.parametrize("field, value, message", [
    ("tolerance", -0.1, "a finite number >= 0"), ("tolerance", float("nan"), "a finite number"),
    ("tolerance", 1.5, "below 1"), ("max_steps", 1, "an integer >= 2"),
    ("error_control", "pixels", "one of 'gap', 'map'")])
def test_bad_tolerance_and_max_steps_are_named(setup, field, value, message):
  with pytest.raises(errors.AnalysisError, match=rf"config\.{field}=.*{message}"):
    validation.validate_config(_config(setup, **{field: value}))


def _attribute_two_images(config):
  """(the shard arrays of two random 80 px images, their images, loaded model, attributor)."""
  validation.validate_config(config)
  loaded = model_source.load_model(config)
  shard = attributor.ShardAttributor(config, loaded, parallel.local_mesh())
  images = np.random.default_rng(6).integers(0, 256, (2, 80, 80, 3), dtype=np.uint8)
  return shard(images, np.arange(2), np.ones((2, 80, 80), bool), None), images, loaded, shard


def test_error_controlled_shards_store_steps_and_meet_the_tolerance(setup):
  config = _config(setup, tolerance=0.05, max_steps=24, quantities=("grade:4",),
                   methods=("integrated_gradients",))
  out, images, loaded, shard = _attribute_two_images(config)
  steps, converged = out["pixel_steps.grade_4"], out["pixel_converged.grade_4"]
  assert steps.dtype == np.int32 and steps.shape == (2,) and (steps >= 2).all()
  assert (steps <= 24).all() and (out["layer_steps.grade_4"] <= 24).all()
  # The stored relative gap is |gap| / |F(x) - F(baseline)| from the model itself.
  x = grading.to_model_input(images)
  logits = model_source.ModelLogits(loaded.model, shard.variables)
  probability = lambda images: jax.nn.softmax(logits(images), axis=-1)[:, 4]
  change = np.asarray(probability(x) - probability(attribution.half_gray_baseline(x)))
  np.testing.assert_allclose(out["pixel_relative_gap.grade_4"],
                             np.abs(out["pixel_gap.grade_4"]) / np.abs(change), rtol=2e-2)
  relative = out["pixel_relative_gap.grade_4"]
  assert (relative[converged] <= 0.05 * 1.01).all()
  assert ((steps == 24) | converged).all()  # an image stops converged or at max_steps


def test_map_controlled_shards_store_estimates_and_meet_the_tolerance(setup):
  config = _config(setup, tolerance=0.05, max_steps=65, error_control="map",
                   quantities=("grade:4",), methods=("integrated_gradients",))
  out = _attribute_two_images(config)[0]
  steps, converged = out["pixel_steps.grade_4"], out["pixel_converged.grade_4"]
  # 16 intervals, each bisected once: 33 evaluations at the first estimate.
  for name in ("pixel_steps.grade_4", "layer_steps.grade_4"):
    assert ((out[name] >= 33) & (out[name] <= 65)).all(), out[name]
  assert ((steps == 65) | converged).all()  # stops converged, or when the budget is spent
  assert (out["pixel_relative_gap.grade_4"][converged] <= 0.05 * 1.01).all()
  # Every image had an estimate.
  map_error = out["pixel_map_error.grade_4"]
  assert map_error.dtype == np.float32 and np.isfinite(map_error).all()
  assert (map_error[converged] <= 0.05).all()


def test_report_shows_the_estimated_map_error_under_map_control(setup, tmp_path):
  config = _config(setup, tolerance=0.01, max_steps=65, error_control="map",
                   quantities=("grade:4",))
  data = {"index": np.arange(3), "pixel_relative_gap.grade_4": np.array([0.001, 0.002, 0.02]),
          "pixel_steps.grade_4": np.array([33, 65, 65]),
          "layer_steps.grade_4": np.array([33, 33, 65]),
          "pixel_converged.grade_4": np.array([True, True, False]),
          "layer_converged.grade_4": np.array([True, True, True]),
          "pixel_map_error.grade_4": np.array([0.004, 0.009, 0.03], np.float32)}
  document = report_document.Report("drig analysis", str(tmp_path))
  metrics = {}
  report_lib._integration_accuracy(config, data, document, metrics)  # pylint: disable=protected-access
  assert metrics["pixel_map_error.grade_4"]["max"] == pytest.approx(0.03)
  assert metrics["pixel_map_error.grade_4"]["median"] == pytest.approx(0.009)
  assert metrics["images_above_tolerance.grade_4"] == [2]
  markdown = document.markdown()
  assert "estimated map error median / max" in markdown and "0.90% / 3.00%" in markdown


def test_report_shows_integration_accuracy(finished):
  workdir, result = finished
  markdown = open(result.report["markdown"], encoding="utf-8").read()
  assert "Integration accuracy" in markdown and "relative gap median" in markdown
  metrics = result.metrics
  assert set(metrics["pixel_relative_gap.grade_4"]) == {"median", "p90", "max"}
  data = shards_lib.load_shards(sorted(glob.glob(os.path.join(workdir, "shards", "*.npz"))))
  above = np.flatnonzero(~(data["pixel_converged.grade_4"] & data["layer_converged.grade_4"]))
  # With fixed steps an image counts as converged when its relative gap is within 1%.
  np.testing.assert_array_equal(data["pixel_converged.grade_4"],
                                data["pixel_relative_gap.grade_4"] <= 0.01)
  assert metrics["images_above_tolerance.grade_4"] == [int(data["index"][i]) for i in above]
  np.testing.assert_array_equal(data["pixel_steps.grade_4"], 4)  # the tiny config's fixed steps


def test_joined_splits_read_each_split_in_order(setup):
  data_config = base_config.get_config("tiny").data
  data_config.data_dir = setup["data_dir"]
  validation_images = images_lib.DatasetImages(data_config, "validation", 0)
  test_images = images_lib.DatasetImages(data_config, "test", 0)
  joined = images_lib.DatasetImages(data_config, "validation+test", 0)
  assert len(joined) == len(validation_images) + len(test_images)
  boundary = len(validation_images)
  for index, (images, own) in {0: (validation_images, 0),
                               boundary - 1: (validation_images, boundary - 1),
                               boundary: (test_images, 0),
                               len(joined) - 1: (test_images, len(test_images) - 1)}.items():
    a, b = joined.read(index), images.read(own)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.label == b.label and a.index == index
  with pytest.raises(errors.AnalysisError, match="no split 'tset'"):
    images_lib.DatasetImages(data_config, "validation+tset", 0)
  with pytest.raises(errors.AnalysisError, match="twice"):
    images_lib.DatasetImages(data_config, "test+test", 0)


def test_shards_and_report_carry_the_units_lesion_types(finished):
  workdir, result = finished
  shards = _shard_arrays(workdir)
  s = shards[0]
  record = json.loads(str(s["study.unit_types"]))
  types = record["types"]
  assert types[-1] == "any_lesion" and record["quantity"] == "predicted"
  channels = s["layer_channels.predicted"].shape[1]
  # Units are grouped by channel: the flat unit index modulo the layer's channels.
  np.testing.assert_array_equal(s["study.unit_channels"], s["top_positive.predicted"] % channels)
  assert s["study.unit_type_share"].shape == (2, 4, len(types))
  assert s["study.type_area_share"].shape == (2, len(types))
  shares = s["study.unit_type_share"]
  defined = shares[np.isfinite(shares)]
  assert defined.size and np.all((defined >= -1e-6) & (defined <= 1 + 1e-6))
  metrics = json.loads(open(result.report["metrics"], encoding="utf-8").read())
  units = metrics["study"]["unit_types"]["table"]["units"]
  merged = np.concatenate([shard["study.unit_channels"] for shard in shards])
  assert set(units) == {str(c) for c in np.unique(merged)}
  for unit, row in units.items():
    assert row["images"] == int((merged == int(unit)).any(axis=1).sum())
  text = open(result.report["markdown"], encoding="utf-8").read()
  assert "Lesion types of the units" in text
  assert "study_unit_types.png" in {os.path.basename(p) for p in result.figures}
