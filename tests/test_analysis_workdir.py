"""An analysis workdir stays usable: bad config values are refused before anything is
written or compiled, and damaged shard files are named, kept aside and never read as data.

The runs that redo a damaged shard and rerun a corrected config live in test_analyze.py,
which has the trained fixture run."""

import io
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import helpers  # tests/helpers.py

from configs import analyze as analyze_config
from drig import files
from drig.analysis import errors
from drig.analysis import job
from drig.analysis import shards as shards_lib
from drig.analysis import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  """The tiny config on random initial weights: no training run needed to validate it."""
  config = analyze_config.get_config("tiny")
  return helpers.apply_overrides(config, overrides)


BAD_VALUES = [
    ("top_k", -3), ("steps", 0), ("method", "simpson"), ("quantities", ("probability",)),
    ("quantities", ("grade:9",)), ("quantities", ()), ("localization.quantity", "grade:5"),
    ("layer", "Conv2d_9z"), ("shard_size", 0), ("storage_dtype", "bfloat16"),
    ("neurons", "neuron"), ("num_images", -1), ("chunk_size", -1), ("data.split", ""),
    ("checkpoint_step", "bestest"), ("init.source", "imagenet"),
    ("figures.num_images", -2), ("figures.percentile", 0.0), ("figures.pair_grades", (2, 2)),
    ("figures.pair_grades", (0, 7)), ("randomisation.num_images", -1),
    ("counterfactuals.target_grade", 5), ("counterfactuals.budget", "linf"),
    ("counterfactuals.cs", (100.0, -1.0)), ("linearity.count", 1),
    ("linearity.factor", 0.0), ("linearity.layers", ("fc9",)),
    ("randomisation.max_stages", 1), ("randomisation.cascade_methods", ("gradient_shap",)),
    ("randomisation.cascade_methods", ("ig",)),
    ("randomisation.data_checkpoint", "/nonexistent/shuffled_labels_run"),
]


@pytest.mark.parametrize("field,value", BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_bad_value_is_named_before_anything_is_written(field, value, tmp_path):
  workdir = tmp_path / "analysis"
  started = time.perf_counter()
  with pytest.raises(errors.AnalysisError) as raised:
    job.run_analysis(_config(**{field: value}), str(workdir))
  elapsed = time.perf_counter() - started
  message = str(raised.value)
  assert f"config.{field}=" in message and "allowed" in message, message
  assert elapsed < 10, f"{elapsed:.1f} s: something was loaded or compiled first"
  assert not workdir.exists()  # no analysis_config.json that would refuse the corrected rerun


def test_data_files_matching_nothing_is_named(tmp_path):
  with pytest.raises(errors.AnalysisError, match=r"config\.data\.files=.*nothing-here"):
    validation.validate_config(_config(**{"data.files": str(tmp_path / "nothing-here*.jpg")}))


def test_the_shipped_configs_are_valid():
  validation.validate_config(_config())
  validation.validate_config(analyze_config.get_config(""))
  for arg in ("study", "study_local", "study_idrid"):  # their checkpoints are the user's
    validation.validate_config(helpers.apply_overrides(analyze_config.get_config(arg),
                                                       {"checkpoint": ""}))
  validation.validate_config(_config(method="trapezoid", steps=2, neurons="channel",
                                     **{"counterfactuals.budget": "coefficient"}))


def test_checkpoint_without_config_json_is_named(tmp_path):
  with pytest.raises(errors.AnalysisError, match=r"config\.checkpoint=.*config\.json"):
    validation.validate_config(_config(checkpoint=str(tmp_path)))


def test_binary_says_what_is_wrong_in_one_line(tmp_path):
  workdir = tmp_path / "analysis"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  started = time.perf_counter()
  process = subprocess.run(
      [sys.executable, "-m", "drig.analyze", "--config=configs/analyze.py:tiny",
       f"--workdir={workdir}", "--config.top_k=-3"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  elapsed = time.perf_counter() - started
  assert process.returncode != 0
  assert "Traceback" not in process.stderr, process.stderr[-3000:]
  last = process.stderr.strip().splitlines()[-1]
  assert "config.top_k=-3" in last and "integer >= 1" in last, process.stderr[-3000:]
  assert len(process.stderr.strip().splitlines()) <= 5, process.stderr
  assert not workdir.exists()
  assert elapsed < 60, f"{elapsed:.1f} s"


def _write_shard(path, **changes):
  arrays = {"index": np.arange(2), "name": np.array(["a", "b"]), "label": np.zeros(2, np.int32),
            "probabilities": np.full((2, 5), 0.2, np.float32),
            "prediction": np.zeros(2, np.int32), "skipped_index": np.zeros(0, np.int64),
            "skipped_name": np.zeros(0, np.str_), "skipped_reason": np.zeros(0, np.str_),
            "format_version": np.array(shards_lib.SHARD_FORMAT_VERSION),
            "pixel_ig.predicted": np.random.default_rng(0).normal(size=(2, 64, 64, 3))}
  arrays.update(changes)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  path.write_bytes(buffer.getvalue())
  return arrays


def test_shard_problem_names_truncated_old_and_incomplete_files(tmp_path):
  good = tmp_path / "shard-00000.npz"
  _write_shard(good)
  assert shards_lib.shard_problem(str(good)) is None
  assert shards_lib.shard_problem(str(good), ["pixel_ig.predicted"]) is None
  truncated = tmp_path / "shard-00001.npz"
  truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
  assert "BadZipFile" in shards_lib.shard_problem(str(truncated))
  old = tmp_path / "shard-00002.npz"
  _write_shard(old, format_version=np.array(0))
  expected = shards_lib.SHARD_FORMAT_VERSION
  assert f"format_version 0, expected {expected}" in shards_lib.shard_problem(str(old))
  incomplete = tmp_path / "shard-00003.npz"
  _write_shard(incomplete, prediction=None)
  assert "missing keys prediction" in shards_lib.shard_problem(str(incomplete))
  problem = shards_lib.shard_problem(str(good), shards_lib.expected_keys(["predicted"]))
  assert problem.startswith("missing keys pixel_ig.predicted.scale, pixel_gap.predicted")
  empty = tmp_path / "shard-00004.npz"
  empty.write_bytes(b"")
  assert shards_lib.shard_problem(str(empty))


def test_unreadable_shard_is_an_analysis_error_naming_it(tmp_path):
  path = tmp_path / "shard-00000.npz"
  arrays = _write_shard(path)
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as archive:  # damage the map's compressed bytes, not the index
    info = archive.getinfo("pixel_ig.predicted.npy")
  middle = info.header_offset + 100 + info.compress_size // 2
  data[middle:middle + 64] = bytes(64)
  path.write_bytes(bytes(data))
  assert shards_lib.shard_problem(str(path)) is None  # the cheap check cannot see it
  with pytest.raises(errors.AnalysisError, match=f"shard file {path} cannot be read") as raised:
    shards_lib.load_shards([str(path)])
  assert raised.value.path == str(path)
  moved = files.move_aside(str(path))
  assert not path.exists() and os.path.basename(moved).startswith("shard-00000.npz.damaged-")
  assert open(moved, "rb").read() == bytes(data)  # kept, not deleted
  _write_shard(path)
  np.testing.assert_array_equal(shards_lib.load_shards([str(path)])["pixel_ig.predicted"],
                                arrays["pixel_ig.predicted"])
