"""Multi-host training and batch attribution, proven with real multi-process runs on localhost.

Each run starts tests/multiprocess_worker.py in fresh Python processes: 2
processes x 2 fake CPU devices joined by ``jax.distributed.initialize`` (gloo
collectives: JAX's default CPU implementation once the distributed client
exists), against 1 process with the same total device count. Device settings
never reach the pytest process. The tiny synthetic data are prepared once, here,
and the children only read them.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers  # tests/helpers.py

from configs import base
from drig import runtime
from drig.data import datasets
from drig.models import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
TIMEOUT_S = 900

# SGD on a float64 model (see _TRAIN_OVERRIDES) makes the comparison meaningful:
# the 1-process run reduces the 4 devices' gradients inside XLA, the 2-process
# run through gloo, in another order. In float32 those rounding-level
# differences are amplified by the tiny random network (permuting a batch moves
# some BatchNorm gradients by ~15%, see tests/test_train.py) and by Adam's first
# step, lr * sign(g). In float64 a real difference (a host's rows dropped or
# counted twice, per-host BatchNorm statistics) stands out by orders of magnitude.
_TRAIN_OVERRIDES = {
    "schedule.steps": [1, 1, 1], "schedule.learning_rates": [0.1, 0.1, 0.1],
    "optimizer.name": "sgd", "model.dtype": "float64", "model.param_dtype": "float64",
    "eval_every": 3, "checkpoint_every": 3,
}

# The analysis job on the tiny model (random weights) and 8 tiny test images:
# 4 shards of 2, so each host owns two (host i: shards i, i + 2). One quantity,
# and host 0's extra experiments (which attribute on host 0 alone) are off: the
# shards are what the hosts share.
_ANALYSIS_OVERRIDES = {
    "data.name": "synthetic_fundus", "data.builder_config": "tiny", "data.image_size": 80,
    "num_images": 8, "shard_size": 2, "quantities": ["predicted"],
    "randomisation.num_images": 0, "counterfactuals.max_images": 0,
    "linearity.num_images": 0,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny synthetic data set, generated once for this module (no JAX devices set up)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  config = base.get_config("tiny")
  config.data.data_dir = path
  datasets.load_builder_from_config(config.data)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the module's runs: reruns skip compiling."""
  global _CACHE_DIR
  _CACHE_DIR = str(tmp_path_factory.mktemp("jax_cache"))


_CACHE_DIR = None


def _env():
  env = dict(os.environ)
  if _CACHE_DIR:
    env["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  # Compiling Inception's programs is most of these runs' time, and each program
  # runs a few times on tiny inputs: skip LLVM's optimisations (about 25% off a
  # run). The reference and the multi-process runs share the flags.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  return env


def _start(mode, *, num_processes, local_devices, data_dir, workdir, out, overrides, x64=False):
  """Starts the processes of one job; returns [(Popen, log path)]."""
  port = _free_port()
  os.makedirs(out, exist_ok=True)
  started = []
  for process_id in range(num_processes):
    log = os.path.join(out, f"log_{process_id}.txt")
    command = [sys.executable, WORKER, mode, f"--process_id={process_id}",
               f"--num_processes={num_processes}", f"--port={port}",
               f"--local_devices={local_devices}", f"--data_dir={data_dir}",
               f"--workdir={workdir}", f"--out={out}", f"--overrides={json.dumps(overrides)}"]
    if x64:
      command.append("--x64")
    with open(log, "w", encoding="utf-8") as f:
      started.append((subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=f,
                                       stderr=subprocess.STDOUT), log))
  return started


def _tail(log, n=3000):
  with open(log, encoding="utf-8", errors="replace") as f:
    return f.read()[-n:]


def _kill(started):
  for process, _ in started:
    if process.poll() is None:
      os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _finish(started, timeout=TIMEOUT_S):
  """Waits for every process; on failure or timeout kills them all and shows the logs."""
  deadline = time.time() + timeout
  try:
    for process, log in started:
      process.wait(timeout=max(1, deadline - time.time()))
      assert process.returncode == 0, f"{log} exited {process.returncode}:\n{_tail(log)}"
  except subprocess.TimeoutExpired:
    pytest.fail(f"timed out after {timeout} s:\n" + "\n".join(_tail(l) for _, l in started))
  finally:
    _kill(started)


def _run(mode, **kwargs):
  _finish(_start(mode, **kwargs))


def _max_relative_difference(a, b):
  return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(a[k])) + 1e-300))
             for k in a)


def test_launch_scripts_parse():
  for name in ("gpu.sh", "tpu_vm.sh", "slurm.sbatch", "env.sh", "demo.sh", "test.sh"):
    result = subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, (name, result.stderr)
  for name in ("gpu.sh", "tpu_vm.sh", "slurm.sbatch"):
    text = open(os.path.join(ROOT, "launch", name), encoding="utf-8").read()
    # The accelerator build is pinned to requirements.txt's jax, not whatever pip picks.
    assert "sed -n 's/^jax==//p' requirements.txt" in text, name
    assert 'python -m "drig.${BINARY}"' in text or "python -m drig.${BINARY}" in text, name


def test_multihost_runtime_is_requested_only_on_several_hosts():
  assert not runtime.multihost_requested("auto", {})
  assert not runtime.multihost_requested("auto", {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
  assert runtime.multihost_requested("auto", {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"})
  assert runtime.multihost_requested("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert runtime.multihost_requested("auto", {"DRIG_COORDINATOR_ADDRESS": "localhost:1234"})
  assert not runtime.multihost_requested("auto", {"TPU_WORKER_HOSTNAMES": "t1v-n-0"})
  assert runtime.multihost_requested("auto", {"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1"})
  assert runtime.multihost_requested("yes", {})
  assert not runtime.multihost_requested("no", {"SLURM_NTASKS": "16", "SLURM_PROCID": "3"})
  with pytest.raises(ValueError, match="auto, yes or no"):
    runtime.multihost_requested("maybe", {})


@pytest.mark.multiprocess
def test_two_processes_train_like_one(data_dir, tmp_path):
  # The 2-process job and its 1-process reference run side by side: compiling
  # dominates, and each process compiles with one thread.
  multi = _start("train", num_processes=2, local_devices=2, data_dir=data_dir,
                 workdir=str(tmp_path / "multi"), out=str(tmp_path / "multi_out"),
                 overrides=_TRAIN_OVERRIDES, x64=True)
  single = _start("train", num_processes=1, local_devices=4, data_dir=data_dir,
                  workdir=str(tmp_path / "single"), out=str(tmp_path / "single_out"),
                  overrides=_TRAIN_OVERRIDES, x64=True)
  _finish(multi + single)
  summaries = [json.loads((tmp_path / "multi_out" / f"summary_{i}.json").read_text())
               for i in range(2)]
  single_summary = json.loads((tmp_path / "single_out" / "summary_0.json").read_text())
  assert [s["process_count"] for s in summaries] == [2, 2]
  assert single_summary["process_count"] == 1
  # A 4-device mesh whose first two devices are host 0's: host 0's rows come first.
  assert summaries[0]["mesh_process_ids"] == summaries[1]["mesh_process_ids"] == [0, 0, 1, 1]
  assert summaries[0]["mesh_device_ids"] == summaries[1]["mesh_device_ids"]
  assert single_summary["mesh_device_ids"] == [0, 1, 2, 3]
  log = _tail(str(tmp_path / "multi_out" / "log_0.txt"), 10**7)
  assert "training mesh {'data': 4}: 4 devices (2 local, cpu), process 0 of 2" in log

  host0, host1 = (dict(np.load(tmp_path / "multi_out" / f"variables_{i}.npz")) for i in range(2))
  single = dict(np.load(tmp_path / "single_out" / "variables_0.npz"))
  assert sorted(host0) == sorted(single) and len(single) > 50
  for key in host0:  # replicated state: bit-identical on both hosts
    np.testing.assert_array_equal(host0[key], host1[key], err_msg=key)
  assert all(v.dtype == np.float64 for k, v in single.items() if k.startswith("params/"))
  worst = _max_relative_difference(single, host0)
  print("2 processes vs 1: worst relative parameter difference", worst)
  assert worst < 1e-6, worst
  # Evaluation gathered every host's rows: the same metrics, every example once.
  for split in ("validation", "test"):
    assert summaries[0][split]["num_examples"] == single_summary[split]["num_examples"] == 15
    np.testing.assert_array_equal(summaries[0][split]["confusion_matrix"],
                                  single_summary[split]["confusion_matrix"])
    assert summaries[0][split] == summaries[1][split]

  # Only host 0 wrote metrics: each record once.
  records = [json.loads(line) for line in open(tmp_path / "multi" / "metrics.jsonl")]
  single_records = [json.loads(line) for line in open(tmp_path / "single" / "metrics.jsonl")]
  assert [sorted(r) for r in records] == [sorted(r) for r in single_records]
  assert [r["step"] for r in records] == [r["step"] for r in single_records]
  # Both hosts wrote the checkpoint together (orbax multi-host); it holds the final
  # parameters. (Read in this process, without x64: float64 arrays come back as float32.)
  saved = checkpoints.load_drig_checkpoint(str(tmp_path / "multi" / "checkpoints"), 3)
  for path, leaf in helpers.flatten(saved["params"], "params/").items():
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(leaf, host0[path].astype(leaf.dtype), err_msg=path)


def _shards(workdir):
  paths = sorted(glob.glob(os.path.join(workdir, "shards", "*.npz")))
  return {os.path.basename(p): dict(np.load(p)) for p in paths}


def _assert_shards_equal(a, b):
  assert sorted(a) == sorted(b) and len(a) == 4, (sorted(a), sorted(b))
  for name in a:
    assert sorted(a[name]) == sorted(b[name]), name
    for key in a[name]:
      np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}:{key}")


@pytest.mark.multiprocess
def test_killed_process_rerun_completes_with_equal_outputs(data_dir, tmp_path):
  workdir = str(tmp_path / "work")
  kwargs = dict(num_processes=2, local_devices=2, data_dir=data_dir, workdir=workdir,
                overrides=_ANALYSIS_OVERRIDES)
  # The reference: the analysis in one process with 2 devices, run alongside.
  single_analysis = str(tmp_path / "single")
  reference = _start("analyze", num_processes=1, local_devices=2, data_dir=data_dir,
                     workdir=single_analysis, out=str(tmp_path / "single_out"),
                     overrides=_ANALYSIS_OVERRIDES)
  try:
    started = _start("analyze", out=str(tmp_path / "out_killed"), **kwargs)
    host1_first = os.path.join(workdir, "shards", "shard-00001.npz")
    deadline = time.time() + TIMEOUT_S
    try:
      while time.time() < deadline and not os.path.exists(host1_first):
        assert all(p.poll() is None for p, _ in started), "\n".join(_tail(l) for _, l in started)
        time.sleep(0.02)
      assert os.path.exists(host1_first), "host 1 wrote no shard in time"
      os.kill(started[1][0].pid, signal.SIGKILL)
      done_at_kill = sorted(_shards(workdir))
    finally:
      # A scheduler stops the whole job when one task dies; so do we (host 0 would
      # otherwise wait at the barrier until the coordination service gives up).
      _kill(started)
    assert started[1][0].returncode == -signal.SIGKILL
    assert "report.md" not in os.listdir(workdir)
    host1_left = [s for s in (1, 3) if f"shard-{s:05d}.npz" not in done_at_kill]
    _run("analyze", out=str(tmp_path / "out_rerun"), **kwargs)
  except BaseException:
    _kill(reference)
    raise
  _finish(reference)
  log1 = _tail(str(tmp_path / "out_rerun" / "log_1.txt"), 10**7)
  # Host 1 redid only its own unfinished shards.
  assert f"host 1 of 2 owns 2, {len(host1_left)} to do" in log1
  # Every shard now comes from a 2-process run (before or after the kill), each
  # host attributing whole shards on its own devices with the same program as one
  # process on 2 devices: the arrays are bit-identical to the single-process run.
  _assert_shards_equal(_shards(workdir), _shards(single_analysis))
  assert os.path.exists(os.path.join(workdir, "report.md"))
