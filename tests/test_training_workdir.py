"""A training workdir's guards: config checks, the lock, damaged checkpoints, init from a run."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers  # tests/helpers.py

from configs import base as base_config
from drig import config_diff
from drig.data import datasets
from drig.models import checkpoints
from drig.models import importer
from drig.models import initialization
from drig.models import weight_files
from drig.training import resume
from drig.training import trainer
from drig.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, data_dir, cache_dir, *flags):
  return subprocess.run(
      [sys.executable, "-m", "drig.train", "--config=configs/base.py:tiny",
       f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags],
      cwd=ROOT, env=helpers.subprocess_env(cache_dir), capture_output=True, text=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, data_dir, cache_dir) of one finished tiny run (checkpoints 6, 8, 10)."""
  root = tmp_path_factory.mktemp("trained")
  data_dir, cache_dir, workdir = root / "tfds", root / "jax_cache", root / "run"
  config = base_config.get_config("tiny")
  config.data.data_dir = str(data_dir)
  datasets.load_builder_from_config(config.data)
  result = _train(workdir, data_dir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "6", "8"]
  return workdir, data_dir, cache_dir


def _snapshot(workdir):
  """Every file's path and bytes under ``workdir``."""
  files = {}
  for dirpath, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def _assert_one_line_error(result, *fragments):
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("drig.train: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0]


def test_a_finished_run_leaves_no_lock(trained):
  workdir, _, _ = trained
  assert not (workdir / workdir_lib.LOCK_FILE).exists()


def test_changed_config_is_refused_before_anything_is_written(trained):
  workdir, data_dir, cache_dir = trained
  before = _snapshot(workdir)
  result = _train(workdir, data_dir, cache_dir, "--config.model.width_multiplier=0.125",
                  "--config.eval_every=3")
  _assert_one_line_error(result, "model.width_multiplier: 0.0625 -> 0.125", "new --workdir")
  assert "eval_every:" not in result.stderr  # a field that may change on resume
  assert _snapshot(workdir) == before  # config.json byte-identical, nothing else written


def test_config_differences_ignore_only_the_resumable_fields():
  old = {"seed": 0, "log_every": 2, "model": {"width": 1}}
  new = {"seed": 1, "log_every": 5, "model": {"width": 1, "depth": 3}}
  assert config_diff.config_differences(old, new, ignore=workdir_lib.RESUMABLE_FIELDS) == [
      "model.depth: '<absent>' -> 3", "seed: 0 -> 1"]


def test_second_process_is_refused_naming_the_holder(trained):
  workdir, data_dir, cache_dir = trained
  holder = subprocess.Popen(["sleep", "120"])
  try:
    lock = workdir / workdir_lib.LOCK_FILE
    lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                "started": "2026-01-01T00:00:00"}))
    before = _snapshot(workdir)
    result = _train(workdir, data_dir, cache_dir)
    _assert_one_line_error(result, f"process {holder.pid} on host {socket.gethostname()!r}",
                           f"kill {holder.pid}")
    assert _snapshot(workdir) == before  # the holder's lock too
  finally:
    holder.kill()
    holder.wait()
    (workdir / workdir_lib.LOCK_FILE).unlink(missing_ok=True)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock_path = tmp_path / workdir_lib.LOCK_FILE
  lock_path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert f"stale lock of process {dead.pid}" in caplog.text
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"process {os.getpid()}"):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert not lock_path.exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
  lock_path = tmp_path / workdir_lib.LOCK_FILE
  lock_path.write_text(json.dumps({"pid": 1, "host": "elsewhere-7"}))
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match=r"process 1 on host 'elsewhere-7'.*remove .*LOCK"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert json.loads(lock_path.read_text())["host"] == "elsewhere-7"


_HOLD_LOCK = r"""
import sys, time
from drig.training import workdir
with workdir.WorkdirLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(120)
"""


def test_sigterm_releases_the_lock(tmp_path):
  process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "locked"
  assert (tmp_path / workdir_lib.LOCK_FILE).exists()
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=60) == 128 + signal.SIGTERM
  assert not (tmp_path / workdir_lib.LOCK_FILE).exists()


def _truncate_largest_data_file(step_dir):
  data = os.path.join(step_dir, "default", "ocdbt.process_0", "d")
  path = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)


def _truncate_metadata(step_dir):
  os.truncate(os.path.join(step_dir, "default", "_METADATA"), 10)


def test_damaged_checkpoints_are_moved_aside_and_the_intact_one_resumed(trained, tmp_path):
  source, data_dir, cache_dir = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  _truncate_largest_data_file(workdir / "checkpoints" / "10")
  _truncate_metadata(workdir / "checkpoints" / "8")
  result = _train(workdir, data_dir, cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  for step in (10, 8):
    reports = [line for line in result.stderr.splitlines()
               if f"checkpoint step {step} at {workdir}/checkpoints/{step} cannot be read" in line]
    assert len(reports) == 1 and len(reports[0]) < 500, result.stderr[-3000:]
  assert "resumed from" in result.stderr and "at step 6" in result.stderr
  names = os.listdir(workdir / "checkpoints")
  assert {n.split(".damaged-")[0] for n in names if ".damaged-" in n} == {"8", "10"}
  # The retrained steps are intact checkpoints again, listed by orbax.
  with trainer.make_checkpoint_manager(str(workdir / "checkpoints"), keep=3) as manager:
    assert sorted(manager.all_steps()) == [6, 8, 10]
  assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 10


def _toy_checkpoints(directory, steps):
  with trainer.make_checkpoint_manager(str(directory), keep=len(steps)) as manager:
    for step in steps:
      manager.save(step, args=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}))
    manager.wait_until_finished()


def test_no_intact_checkpoint_lists_the_directories_to_remove(tmp_path):
  directory = tmp_path / "checkpoints"
  _toy_checkpoints(directory, [1, 2])
  _truncate_metadata(directory / "1")
  _truncate_metadata(directory / "2")
  with pytest.raises(resume.NoIntactCheckpointError,
                     match=r"checkpoints/2, .*checkpoints/1\). Remove these directories"):
    resume.restore_latest_intact(
        lambda: trainer.make_checkpoint_manager(str(directory), keep=2),
        lambda manager, step: manager.restore(step), is_writer=True)
  assert sorted(os.listdir(directory)) == ["1", "2"]  # nothing moved


def test_load_drig_checkpoint_names_the_damaged_step(trained, tmp_path):
  source, _, _ = trained
  damaged = tmp_path / "checkpoints"
  shutil.copytree(source / "checkpoints", damaged)
  _truncate_largest_data_file(damaged / "10")
  _truncate_metadata(damaged / "8")
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=r"checkpoints/10/default: checkpoint step 10 is damaged") as error:
    checkpoints.load_drig_checkpoint(str(damaged))
  assert "\n" not in str(error.value) and error.value.step == 10
  with pytest.raises(weight_files.WeightImportError,
                     match=r"checkpoints/8/default: checkpoint step 8 is damaged.*JSONDecodeError"):
    checkpoints.load_drig_checkpoint(str(damaged), step=8)


def test_init_from_a_training_workdir_takes_its_latest_step(trained):
  workdir, _, _ = trained
  config = base_config.get_config("tiny")
  initialization.check_weight_source("drig", str(workdir))
  latest = checkpoints.load_drig_checkpoint(str(workdir / "checkpoints" / "10"))
  zeros = jax.tree.map(np.zeros_like, latest)
  variables, report = importer.initialise_from(zeros, source="drig", path=str(workdir),
                                               model_config=config.model)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(latest)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "checkpoints/10/default" in str(report)
