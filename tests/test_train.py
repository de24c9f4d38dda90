"""The training library and binary on tiny synthetic data with the tiny model."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import helpers  # tests/helpers.py

from configs import base as base_config
from configs import kaggle
from drig import grading
from drig import input_pipeline
from drig import parallel
from drig.data import datasets
from drig.input import sampling
from drig.models import runs
from drig.training import bootstrap
from drig.training import metrics as metrics_lib
from drig.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny synthetic data set, generated once for this module."""
  path = str(tmp_path_factory.mktemp("tfds"))
  datasets.load_builder_from_config(_config(path).data)
  return path


def _config(data_dir, **overrides):
  config = base_config.get_config("tiny")
  config.data.data_dir = data_dir
  return helpers.apply_overrides(config, overrides)


def _read_checkpoint(path):
  path = os.path.abspath(path)
  # CheckpointManager keeps its single item in the "default" folder of each step.
  if os.path.isdir(os.path.join(path, "default")):
    path = os.path.join(path, "default")
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path)


def _assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _test_split_metrics(workdir, data_dir, which, flips=False):
  """The test split's metrics of a workdir's checkpoint, evaluated outside the trainer.

  ``flips``: average the probabilities over the image and its horizontal,
  vertical and double flips.
  """
  run = runs.load_run(str(workdir), which)
  source = trainer.load_sources(_config(data_dir).data, prepare=False)["test"]
  examples = [source[i] for i in range(len(source))]
  images = np.stack([e["image"] for e in examples])
  copies = ([images, images[:, ::-1], images[:, :, ::-1], images[:, ::-1, ::-1]] if flips
            else [images])
  probabilities = np.mean([
      jax.nn.softmax(run.model.apply(run.variables, grading.to_model_input(np.ascontiguousarray(c)),
                                     train=False).astype(jnp.float32), -1) for c in copies], 0)
  return run.step, metrics_lib.grading_metrics([int(e["label"]) for e in examples], probabilities)


def _assert_same_metrics(reported, expected):
  assert reported["confusion_matrix"] == expected["confusion_matrix"]
  for name in ("accuracy", "quadratic_kappa", "auc_any_dr", "sensitivity_any_dr"):
    assert reported[name] == pytest.approx(expected[name], abs=1e-5), name
  np.testing.assert_allclose(reported["recall_per_grade"], expected["recall_per_grade"])


def test_a_few_steps_write_metrics_and_checkpoints(data_dir, tmp_path):
  config = _config(data_dir)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  total = sum(config.schedule.steps)
  assert int(result.state.step) == total
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
  train_records = [r for r in records if "train/loss" in r]
  eval_records = [r for r in records if "val/quadratic_kappa" in r]
  assert [r["step"] for r in train_records] == list(range(2, total + 1, 2))
  assert all(np.isfinite(r["train/loss"]) for r in train_records)
  # The schedule's phases reach the step: 1e-3 for 4 steps, 2e-4 for 3, then 5e-5.
  rates = {r["step"]: r["train/learning_rate"] for r in train_records}
  assert rates[2] == pytest.approx(1e-3) and rates[6] == pytest.approx(2e-4)
  assert rates[10] == pytest.approx(5e-5)
  assert [r["step"] for r in eval_records] == [5, 10]
  assert eval_records[-1]["val/num_examples"] == 15  # every validation example, once
  assert sum(map(sum, eval_records[-1]["val/confusion_matrix"])) == 15
  assert os.listdir(tmp_path / "tensorboard")
  assert "randomly initialised" in (tmp_path / "init_report.txt").read_text()
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert final["validation"]["quadratic_kappa"] == eval_records[-1]["val/quadratic_kappa"]
  assert final["test"]["num_examples"] == 15 and final["step"] == total
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == total and len(steps) <= config.keep_checkpoints + 1
  # The test split is evaluated with the kept checkpoint of the best validation kappa
  # (the later one on a tie), which is what the analysis loads.
  kappas = {r["step"]: r["val/quadratic_kappa"] for r in eval_records}
  best = max((kappas[s], s) for s in steps if s in kappas)[1]
  assert final["test_checkpoint"]["step"] == best == result.test_step
  assert final["test_checkpoint"]["selection"] == "best"
  step, expected = _test_split_metrics(tmp_path, data_dir, "best")
  assert step == best
  _assert_same_metrics(final["test"], expected)
  assert (final["test_at_last_step"] is None) == (best == total)
  intervals = final["test_confidence_intervals"]
  assert intervals["num_resamples"] == config.evaluation.bootstrap_resamples
  assert set(intervals["intervals"]) == set(bootstrap.INTERVAL_METRICS)
  low, high = intervals["intervals"]["quadratic_kappa"]
  assert low <= final["test"]["quadratic_kappa"] <= high
  saved = _read_checkpoint(tmp_path / "checkpoints" / str(total))
  _assert_trees_equal(saved["params"], result.state.params)


def test_test_split_uses_the_configured_checkpoint_and_labels_the_last_step(data_dir, tmp_path):
  # Also the ordinal head, the loss and test-time augmentation options, end to end.
  config = _config(data_dir, **{"schedule.steps": (2, 1, 1), "keep_checkpoints": 5,
                                "model.head": "ordinal",
                                "evaluation.checkpoint": "2",
                                "evaluation.bootstrap_resamples": 50,
                                "evaluation.test_time_augmentation": "flips",
                                "loss.name": "focal", "loss.label_smoothing": 0.1,
                                "loss.class_weight_power": 1.0})
  result = trainer.train_and_evaluate(config, str(tmp_path))
  final = json.loads((tmp_path / "final_metrics.json").read_text())
  assert final["step"] == 4 and result.test_step == 2
  assert final["test_checkpoint"] == {"step": 2, "selection": "2",
                                      "why": "config.checkpoint_step"}
  _assert_same_metrics(final["test"], _test_split_metrics(tmp_path, data_dir, "2", flips=True)[1])
  assert final["test_at_last_step"]["step"] == 4
  _assert_same_metrics(final["test_at_last_step"],
                       _test_split_metrics(tmp_path, data_dir, "4", flips=True)[1])
  assert final["test_confidence_intervals"]["num_resamples"] == 50
  with pytest.raises(ValueError, match="config.evaluation.checkpoint"):
    trainer.check_inputs(_config(data_dir, **{"evaluation.checkpoint": "last"}))


def test_balanced_batches_reach_the_train_step(data_dir):
  config = _config(data_dir)
  sources = trainer.load_sources(config.data, prepare=False)
  batches = input_pipeline.train_iterator(sources["train"], config.data,
                                          batch_size=config.batch_size, seed=0)
  mesh = parallel.data_mesh()
  count_grades = jax.jit(lambda batch: jnp.bincount(batch["label"], length=5))
  expected = sampling.class_counts(config.batch_size, config.data.class_proportions)
  for _ in range(5):
    counts = count_grades(parallel.host_local_to_global(next(batches), mesh))
    np.testing.assert_array_equal(np.asarray(counts), expected)
  np.testing.assert_array_equal(expected, [8, 1, 2, 1, 4])
  batches.close()


def test_non_finite_loss_stops_with_the_step(data_dir, tmp_path):
  # Adam moves every weight by about the learning rate: 1e30 overflows at once.
  config = _config(data_dir, **{"schedule.learning_rates": (1e30, 1e30, 1e30)})
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 1\b"):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_config_typo_is_an_error():
  config = base_config.get_config("runlocal")
  config.lock()
  with pytest.raises(AttributeError):
    config.batch_szie = 8
  with pytest.raises(AttributeError):
    config.optimizer.learning_rate = 1e-3
  with pytest.raises(ValueError, match="unknown configs/.*argument"):
    base_config.get_config("runlcoal")


def test_global_batch_must_divide_by_devices():
  mesh = parallel.data_mesh()
  with pytest.raises(ValueError, match="does not divide"):
    parallel.check_global_batch(3, jax.sharding.Mesh(np.array(jax.devices() * 2), ("data",)))
  parallel.check_global_batch(4, mesh)


def _train_command(workdir, data_dir):
  return [sys.executable, "-m", "drig.train", "--config=configs/base.py:tiny",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.schedule.steps=(8,8,8)", "--config.eval_every=100"]


def _finished_steps(checkpoint_dir):
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(d) for d in os.listdir(checkpoint_dir) if d.isdigit())


def test_resume_after_kill_equals_uninterrupted_run(data_dir, tmp_path):
  env = helpers.subprocess_env(tmp_path / "jax_cache")
  reference = tmp_path / "reference"
  subprocess.run(_train_command(reference, data_dir), cwd=ROOT, env=env, check=True,
                 capture_output=True)
  killed = tmp_path / "killed"
  process = subprocess.Popen(_train_command(killed, data_dir), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  try:
    while time.time() < deadline and process.poll() is None:
      done = _finished_steps(killed / "checkpoints")
      if done and done[-1] >= 6:
        break
      time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
  finally:
    process.wait()
  assert process.returncode == -signal.SIGKILL
  interrupted_at = _finished_steps(killed / "checkpoints")[-1]
  assert 6 <= interrupted_at < 24
  resumed = subprocess.run(_train_command(killed, data_dir), cwd=ROOT, env=env,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  _assert_trees_equal(_read_checkpoint(killed / "checkpoints" / "24"),
                      _read_checkpoint(reference / "checkpoints" / "24"))


_DATA_PARALLEL_SCRIPT = r"""
import os, sys, functools
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np, optax
# In float32 the tiny random network's gradients are ill-conditioned: merely
# permuting the batch on one device moves some BatchNorm gradients by ~15%.
# In float64 any real difference between 1 and 8 devices stands out.
jax.config.update("jax_enable_x64", True)
sys.path.insert(0, os.getcwd())
from configs import base as base_config
from drig import parallel
from drig.models import classifier, initialization
from drig.training import trainer, optimizer

config = base_config.get_config("tiny")
# SGD: the update is linear in the gradient. (Adam's first step is lr * sign(g),
# which flips for gradients at rounding level and hides nothing but noise.)
config.optimizer.name = "sgd"
config.schedule.learning_rates = (0.1, 0.1, 0.1)
config.model.dtype = config.model.param_dtype = "float64"
model = classifier.build_model(config.model)
root_key = jax.random.key(0)
variables, _ = initialization.initial_variables(
    model, config.model, rngs=initialization.init_rngs(root_key), image_size=config.data.image_size,
    source=config.init.source, path=config.init.path)
schedule = optimizer.learning_rate_schedule(config.schedule.learning_rates, config.schedule.steps)
tx = optimizer.make_optimizer(config.optimizer, schedule)
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (16, 80, 80, 3), dtype=np.uint8),
         "label": rng.integers(0, 5, 16).astype(np.int32)}
results = []
for devices in (jax.devices()[:1], jax.devices()):
  assert len(devices) in (1, 8)
  mesh = parallel.data_mesh(devices)
  state = trainer.TrainState(step=jax.numpy.zeros((), jax.numpy.int32),
                             params=variables["params"], batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]))
  state = parallel.replicate(state, mesh)
  step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, root_key=root_key,
                                   freeze_base_steps=0, schedule=schedule))
  sharded = parallel.host_local_to_global(batch, mesh)
  assert len(sharded["image"].sharding.device_set) == len(devices)
  new_state, metrics = step(state, sharded)
  results.append(jax.device_get((new_state.params, new_state.batch_stats, metrics["loss"])))
flat1, flat8 = jax.tree.leaves(results[0]), jax.tree.leaves(results[1])
worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(flat1, flat8))
print("WORST_RELATIVE_DIFFERENCE", worst)
# Logits are cast to float32 for the loss, so agreement is to ~1e-7, not 1e-15; a
# per-device BatchNorm or a dropped shard would show as O(1) differences.
assert worst < 1e-6, worst
"""


def test_data_parallel_step_on_8_devices_equals_one_device():
  env = helpers.subprocess_env("/tmp/drig_unused_cache")
  env.pop("JAX_COMPILATION_CACHE_DIR")
  result = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "WORST_RELATIVE_DIFFERENCE" in result.stdout


def test_kaggle_config_fails_at_start_up_with_download_instructions(tmp_path):
  # Lazy: the EyePACS builder imports TensorFlow Datasets (heavy).
  from drig.data import eyepacs  # pylint: disable=g-import-not-at-top
  config = kaggle.get_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.manual_dir = str(tmp_path / "manual")
  config.init.path = str(tmp_path / "weights" / "inception_v3_notop.h5")
  with pytest.raises(FileNotFoundError, match="inception_v3_weights_tf_dim_ordering.*notop.h5"):
    trainer.train_and_evaluate(config, str(tmp_path / "work"))
  (tmp_path / "weights").mkdir()
  (tmp_path / "weights" / "inception_v3_notop.h5").write_bytes(b"placeholder")
  with pytest.raises(eyepacs.ManualDownloadError, match="kaggle"):
    trainer.train_and_evaluate(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()  # nothing started


class _ToyClassifier:
  """A two-part Flax model with the classifier's parameter layout ("base" + head)."""

  def __new__(cls):

    class Toy(nn.Module):

      @nn.compact
      def __call__(self, x, train=False):
        h = nn.Conv(4, (3, 3), name="base")(x)
        h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
        h = nn.Dropout(0.5, deterministic=not train)(h.mean(axis=(1, 2)))
        return nn.Dense(5, name="logits")(h)

    return Toy()


def test_freeze_base_steps_trains_only_the_head_at_first():
  model = _ToyClassifier()
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 12, 12, 3), dtype=np.uint8),
           "label": rng.integers(0, 5, 8).astype(np.int32)}
  variables = model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)))
  tx = optax.sgd(0.1)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                             batch_stats=variables["batch_stats"],
                             opt_state=tx.init(variables["params"]))
  step = jax.jit(lambda s, b: trainer.train_step(
      s, b, model=model, tx=tx, root_key=jax.random.key(1), freeze_base_steps=1,
      schedule=lambda _: 0.1))
  first, _ = step(state, batch)
  second, _ = step(first, batch)
  # Step 0 is frozen: the base keeps its weights, the head moves.
  _assert_trees_equal(first.params["base"], state.params["base"])
  assert not np.allclose(first.params["logits"]["kernel"], state.params["logits"]["kernel"])
  # Step 1 is past the freeze: the base moves too.
  assert not np.allclose(second.params["base"]["kernel"], first.params["base"]["kernel"])


def test_checkpoint_manager_keeps_the_best_kappa_beside_the_latest(tmp_path):
  kappas = {1: 0.2, 2: 0.9, 3: None, 4: 0.5, 5: 0.4, 6: None}
  with trainer.make_checkpoint_manager(str(tmp_path / "ckpt"), keep=2) as manager:
    for step, kappa in kappas.items():
      manager.save(step, args=ocp.args.StandardSave({"w": np.full(3, step, np.float32)}),
                   metrics=None if kappa is None else {"quadratic_kappa": kappa})
    manager.wait_until_finished()
    assert manager.best_step() == 2
    assert sorted(manager.all_steps()) == [2, 5, 6]
  # The metrics are on disk: a new manager (a resumed run, the analysis) finds the best.
  with trainer.make_checkpoint_manager(str(tmp_path / "ckpt"), keep=2) as manager:
    assert manager.best_step() == 2
    assert manager.metrics(2) == {"quadratic_kappa": 0.9}
