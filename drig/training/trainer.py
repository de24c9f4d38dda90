"""The training loop as a library function: ``train_and_evaluate(config, workdir)``.

One concept: the training loop (state, steps, evaluations, checkpoints, logging).

Design:
* One root PRNG key from ``config.seed``; each use derives its key with
  ``fold_in`` of a fixed name and the step, so a resumed run draws exactly the
  keys an uninterrupted run would.
* The input pipeline is a pure function of (seed, step), so resuming needs only
  the step from the checkpoint.
* Data parallelism: a 1-D mesh over every device of every host, the batch
  sharded over it with ``NamedSharding``, the state replicated. Each host feeds
  its own slice of the global batch (``jax.make_array_from_process_local_data``).
* The train step is jitted once with the state donated.
* Checkpoints: orbax ``CheckpointManager``, asynchronous, keeping the last
  ``keep_checkpoints`` and the best by validation quadratic kappa.
* The test split is evaluated once, after training, with the checkpoint the
  analysis would load (``config.evaluation.checkpoint``, "best" by validation
  kappa by default; chosen by ``drig.models.runs.choose_checkpoint_step``),
  with bootstrap confidence intervals over the test images. orbax is
  imported where it is used: it takes about 1.5 s to import, which callers
  that only need this module's step functions would otherwise pay.
"""

import contextlib
import dataclasses
import functools
import json
import logging as logging_lib
import os
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import optax

from drig import grading
from drig import input_pipeline
from drig import parallel
from drig import progress as progress_lib
from drig import prng
from drig.data import datasets
from drig.input import labels as labels_lib
from drig.input import sampling
from drig.models import classifier
from drig.models import initialization
from drig.models import runs
from drig.training import bootstrap
from drig.training import evaluation
from drig.training import losses
from drig.training import metrics as metrics_lib
from drig.training import metric_writer as metric_writer_lib
from drig.training import optimizer as optimizer_lib
from drig.training import resume
from drig.training import summaries as summaries_lib
from drig.training import workdir as workdir_lib


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; a plain pytree."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- #
# Steps.


def base_param_mask(params) -> Any:
  """True for the parameters of the Inception base (frozen early if asked)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(path) and getattr(path[0], "key", None) == "base", params)


def train_step(state: TrainState, batch: dict, *, model, tx, root_key, freeze_base_steps: int,
               schedule, batch_loss: Optional[losses.LossFn] = None) -> tuple[TrainState, dict]:
  """One optimisation step on a (sharded) batch. Pure; jitted by the caller.

  ``batch_loss(outputs, labels)`` is the batch loss (``losses.make_loss``); None is
  the poster's softmax cross-entropy. The outputs are the logits, or the
  regression head's grade estimates (``evaluation.output_kwargs``).
  """
  dropout_key = prng.named_key(root_key, "dropout", state.step)
  images = grading.to_model_input(batch["image"])
  labels = batch["label"]

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                  train=True, mutable=["batch_stats"],
                                  rngs={"dropout": dropout_key},
                                  **evaluation.output_kwargs(model))
    logits = logits.astype(jnp.float32)
    if batch_loss is None:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    else:
      loss = batch_loss(logits, labels)
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if freeze_base_steps > 0:
    frozen = state.step < freeze_base_steps
    grads = jax.tree.map(lambda g, is_base: jnp.where(frozen & is_base, jnp.zeros_like(g), g),
                         grads, base_param_mask(grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  step_metrics = {
      "loss": loss,
      "accuracy": jnp.mean(evaluation.predicted_grades(model, logits, batch_stats) == labels),
      "learning_rate": schedule(state.step),
      "grad_norm": optax.global_norm(grads),
  }
  return new_state, step_metrics


# --------------------------------------------------------------------------- #
# Data, from the config.


def load_sources(data_config, *, prepare: bool) -> dict:
  """Random-access sources of the train and evaluation splits of ``data_config``.

  The data set is generated first when it is synthetic and missing (only on
  host 0 if ``prepare``; the others wait for it at the barrier).
  """
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      datasets.load_builder_from_config(data_config, prepare=prepare)
    multihost_utils.sync_global_devices("drig:data_prepared")
  builder = datasets.load_builder_from_config(data_config, prepare=prepare)
  sources = {"train": builder.as_data_source(data_config.train_split),
             "validation": builder.as_data_source(data_config.eval_split)}
  test_split = data_config.get("test_split")
  if test_split and test_split in builder.info.splits:
    sources["test"] = builder.as_data_source(test_split)
  return sources


def training_labels(config, source) -> np.ndarray:
  """The labels the run trains on: the train split's, or a permutation of them.

  With ``config.data.shuffle_labels`` (Adebayo et al.'s data-randomisation
  check) they are ``labels.permuted_labels`` with the key named
  "shuffle_labels" of ``config.seed``: the same on every host and on resuming,
  each class keeping its count. Only the train split is shuffled; validation
  and test keep their true labels, so their metrics show what the model learnt
  that transfers.

  Args:
    config: the training config (``seed``, ``data.shuffle_labels``).
    source: the train split's random-access source.

  Returns:
    int64 ``[len(source)]``.
  """
  labels = labels_lib.load_labels(source)
  if not config.data.get("shuffle_labels", False):
    return labels
  key = prng.named_key(jax.random.key(config.seed), "shuffle_labels")
  return labels_lib.permuted_labels(labels, key)


# --------------------------------------------------------------------------- #
# Checkpoints.


def _checkpoint_kappa(metrics) -> float:
  return metrics["quadratic_kappa"]


def make_checkpoint_manager(directory: str, keep: int):
  """An asynchronous orbax ``CheckpointManager`` keeping the last ``keep`` and the best."""
  # Lazy: orbax is slow to import (see the module docstring).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint import checkpoint_managers as managers  # pylint: disable=g-import-not-at-top
  policy = managers.AnyPreservationPolicy([
      managers.LatestN(n=keep),
      managers.BestN(get_metric_fn=_checkpoint_kappa, n=1,
                     keep_checkpoints_without_metrics=False),
  ])
  # best_fn is what makes orbax write the metrics beside each checkpoint; without it
  # BestN never sees a kappa and only LatestN keeps anything.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                         best_fn=_checkpoint_kappa, best_mode="max",
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  absl_logger = logging_lib.getLogger("absl")
  if _UNEVALUATED_CHECKPOINT_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_UNEVALUATED_CHECKPOINT_FILTER)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class _UnevaluatedCheckpointFilter(logging_lib.Filter):
  """Drops orbax's warning that a checkpoint was saved without metrics.

  Checkpoints between evaluations carry no kappa by design (the preservation
  policy keeps the latest ones and the best evaluated one), so the warning
  orbax logs at each of them says nothing a user can act on.
  """

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


_UNEVALUATED_CHECKPOINT_FILTER = _UnevaluatedCheckpointFilter()


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  eval_metrics: Optional[dict]    # validation split, at the last step
  test_metrics: Optional[dict]    # test split, with the checkpoint of test_step
  workdir: str
  test_step: Optional[int] = None  # the checkpoint the test split was evaluated with


def check_evaluation_checkpoint(which) -> None:
  """Raises ValueError unless ``which`` is "best", "latest" or a step number."""
  text = str(which).strip()
  if text not in ("best", "latest") and not text.isdigit():
    raise ValueError(f"config.evaluation.checkpoint must be 'best', 'latest' or a step number, "
                     f"got {which!r}")


def check_inputs(config) -> None:
  """Fails fast, before any data are generated, when a needed file is missing.

  Raises:
    ValueError: ``config.init.source``, ``config.evaluation`` or
      ``config.loss`` names something unknown or out of range.
    FileNotFoundError: the initial weights named by ``config.init`` are absent;
      the message says what to download and where to put it.
    drig.data.eyepacs.ManualDownloadError: EyePACS is neither prepared nor
      downloaded into ``config.data.manual_dir``.
  """
  initialization.check_weight_source(config.init.source, config.init.path)
  check_evaluation_checkpoint(config.evaluation.checkpoint)
  evaluation.check_test_time_augmentation(config.evaluation.test_time_augmentation)
  losses.check_loss_config(config.loss, config.model.get("head", "softmax"))
  if config.data.name == "eyepacs":
    # Lazy: the EyePACS builder imports TensorFlow Datasets (heavy).
    from drig.data import eyepacs  # pylint: disable=g-import-not-at-top
    try:
      datasets.load_builder_from_config(config.data, prepare=False)
    except datasets.DatasetNotPreparedError:
      eyepacs.check_manual_dir(config.data.manual_dir)


def train_and_evaluate(config, workdir: str) -> TrainResult:
  """Trains the DR grader described by ``config``; resumes from ``workdir``.

  Raises:
    drig.training.workdir.ConfigMismatchError: ``workdir`` holds a run of
      another config (nothing is written).
    drig.training.workdir.WorkdirLockedError: another process trains in
      ``workdir``.
    drig.training.resume.NoIntactCheckpointError: no checkpoint of
      ``workdir`` can be read.
  """
  check_inputs(config)
  is_writer = jax.process_index() == 0
  # Only host 0 writes, so only it locks (the lock lives on the shared file system).
  with workdir_lib.WorkdirLock(workdir) if is_writer else contextlib.nullcontext():
    workdir_lib.check_config(workdir, config)
    return _train_and_evaluate(config, workdir, is_writer)


def _train_and_evaluate(config, workdir: str, is_writer: bool) -> TrainResult:
  """``train_and_evaluate`` once the workdir is checked and locked."""
  # Lazy: orbax is slow to import (see the module docstring).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mesh = parallel.data_mesh()
  # Every device and host gets whole rows, and every batch whole per-class counts.
  proportions = config.data.get("class_proportions", sampling.DEFAULT_CLASS_PROPORTIONS)
  parallel.check_global_batch(config.batch_size, mesh,
                              multiple_of=sampling.batch_unit(proportions))
  parallel.log_mesh(mesh, "training")
  os.makedirs(workdir, exist_ok=True)
  if is_writer:
    workdir_lib.write_config(workdir, config)

  root_key = jax.random.key(config.seed)
  model = classifier.build_model(config.model)
  schedule = optimizer_lib.learning_rate_schedule(config.schedule.learning_rates,
                                                  config.schedule.steps)
  tx = optimizer_lib.make_optimizer(config.optimizer, schedule)

  sources = load_sources(config.data, prepare=True)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def fresh_state():
    variables, report = initialization.initial_variables(
        model, config.model, rngs=initialization.init_rngs(root_key), image_size=config.data.image_size,
        source=config.init.source, path=config.init.path)
    logging.info("initialisation: %s", report)
    if is_writer:
      with open(os.path.join(workdir, "init_report.txt"), "w", encoding="utf-8") as f:
        f.write(str(report) + "\n")
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]))

  def abstract_state():
    dummy = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
    variables = model.init({"params": root_key, "dropout": root_key}, dummy, train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]))

  def restore(manager, step):
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(abstract_state))
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))

  checkpoints, state, latest = resume.restore_latest_intact(
      functools.partial(make_checkpoint_manager, os.path.join(workdir, "checkpoints"),
                        config.keep_checkpoints), restore, is_writer=is_writer)
  # From here on every exit closes the manager first, in order: an open one
  # leaves asyncio threads that flood stderr when the interpreter exits.
  try:
    if latest is None:
      state = parallel.replicate(fresh_state(), mesh)
    else:
      logging.info("resumed from %s at step %d", checkpoints.directory, latest)
    return _train_loop(config, workdir, is_writer, state=state, checkpoints=checkpoints,
                       model=model, tx=tx, schedule=schedule, root_key=root_key, mesh=mesh,
                       sources=sources, restore=functools.partial(restore, checkpoints))
  finally:
    checkpoints.close()


def _train_loop(config, workdir, is_writer, *, state, checkpoints, model, tx, schedule,
                root_key, mesh, sources, restore) -> TrainResult:
  """Trains from ``state`` to the end of the schedule, evaluating and checkpointing.

  ``restore(step)`` returns the TrainState of a kept checkpoint.
  """
  # Lazy: orbax is slow to import (see the module docstring).
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  total_steps = sum(config.schedule.steps)
  start_step = int(state.step)
  proportions = config.data.get("class_proportions", sampling.DEFAULT_CLASS_PROPORTIONS)
  batch_loss = losses.make_loss(config.loss, proportions, config.model.num_classes,
                                config.model.get("head", "softmax"))
  train_step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, root_key=root_key,
                        freeze_base_steps=config.freeze_base_steps, schedule=schedule,
                        batch_loss=batch_loss),
      donate_argnums=(0,))
  predict_fn = jax.jit(functools.partial(
      evaluation.predict_step, model=model,
      test_time_augmentation=config.evaluation.test_time_augmentation))

  writer = metric_writer_lib.MetricWriter(workdir, enabled=is_writer)
  summaries = summaries_lib.TrainingSummaries(config, writer, model, sources["validation"])
  train_labels = training_labels(config, sources["train"])
  shuffled_labels = bool(config.data.get("shuffle_labels", False))
  if shuffled_labels:
    logging.info("data.shuffle_labels: training on a random permutation of the train split's "
                 "labels (%d of %d examples relabelled); validation and test keep the true "
                 "labels", int(np.sum(train_labels != labels_lib.load_labels(sources["train"]))),
                 len(train_labels))
  train_batches = input_pipeline.train_iterator(
      sources["train"], config.data, batch_size=config.batch_size, seed=config.seed,
      start_step=start_step, labels=train_labels, process_index=jax.process_index(),
      process_count=jax.process_count())

  def predict_split(variables, split):
    batches = input_pipeline.eval_batches(sources[split], config.eval_batch_size,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    return evaluation.predict_all(predict_fn, variables, batches, mesh)

  def run_eval(step, variables, split="validation", prefix="val/", label=None):
    """Metrics of ``split``, its predictions, and the variables with the regression
    head's thresholds fitted on it when it is the validation split."""
    labels, outputs, mask = predict_split(variables, split)
    probabilities, variables, head_metrics = evaluation.grade_probabilities(
        model, variables, outputs, labels, mask, fit_thresholds=split == "validation")
    eval_metrics = {**metrics_lib.grading_metrics(labels, probabilities, mask=mask),
                    **head_metrics}
    writer.write(step, eval_metrics, prefix=prefix)
    summaries.at_evaluation(step, prefix, eval_metrics,
                            variables if split == "validation" else None)
    evaluation.log_grading_metrics(step, label or split, eval_metrics)
    return eval_metrics, (labels, probabilities, mask), variables

  eval_metrics = None
  pending = None  # (step, metrics on device) of the step dispatched last.
  window_start, window_steps = time.perf_counter(), 0
  # The ETA leaves out the first step, which compiles the train step.
  progress = progress_lib.Progress(total_steps, done=start_step)
  try:
    for step in range(start_step, total_steps):
      host_batch = next(train_batches)
      if step == start_step:
        summaries.at_start(step, host_batch)
      batch = parallel.host_local_to_global(host_batch, mesh)
      state, step_metrics = train_step_fn(state, batch)
      if step == start_step:
        jax.block_until_ready(step_metrics)
        progress.update(step + 1)
      # Check the previous step's loss while this one runs: names the exact step
      # that went wrong without stalling the device pipeline.
      if pending is not None:
        _check_and_log(pending, writer, config, total_steps, window_start, window_steps)
      pending = (step, step_metrics)
      window_steps += 1
      done = step + 1
      if done % config.log_every == 0 or done == total_steps:
        progress.update(done)
        _check_and_log(pending, writer, config, total_steps, window_start, window_steps,
                       force_log=True, eta=progress.eta())
        pending = None
        window_start, window_steps = time.perf_counter(), 0
      is_eval = done % config.eval_every == 0 or done == total_steps
      if is_eval:
        if pending is not None:
          _check_and_log(pending, writer, config, total_steps, window_start, window_steps)
          pending = None
        eval_metrics, _, fitted = run_eval(done, state.variables())
        # The regression head's thresholds fitted on this evaluation go into the
        # checkpoint saved below, so the test split and the analysis use them.
        if evaluation.is_regression(model):
          state = state.replace(batch_stats=parallel.replicate(fitted["batch_stats"], mesh))
      if is_eval or done % config.checkpoint_every == 0:
        if pending is not None:
          _check_and_log(pending, writer, config, total_steps, window_start, window_steps)
          pending = None
        checkpoints.save(done, args=ocp.args.StandardSave(state),
                         metrics=({"quadratic_kappa": eval_metrics["quadratic_kappa"]}
                                  if is_eval else None))
    if pending is not None:
      _check_and_log(pending, writer, config, total_steps, window_start, window_steps)
    if eval_metrics is None and start_step >= total_steps:
      eval_metrics, _, _ = run_eval(int(state.step), state.variables())
    # The checkpoints on disk (and metrics.jsonl) are what the choice is made from.
    checkpoints.wait_until_finished()
    test_report = (_evaluate_test(config, workdir, state, restore, run_eval)
                   if "test" in sources else None)
  finally:
    checkpoints.wait_until_finished()
    writer.close()
    close = getattr(train_batches, "close", None)
    if close is not None:
      close()
  final = {"step": int(state.step), "shuffled_train_labels": shuffled_labels,
           "validation": eval_metrics}
  final.update(test_report or {"test": None})
  if is_writer:
    with open(os.path.join(workdir, "final_metrics.json"), "w", encoding="utf-8") as f:
      json.dump(final, f, indent=2)
  return TrainResult(state=state, eval_metrics=eval_metrics, test_metrics=final["test"],
                     workdir=workdir,
                     test_step=final["test_checkpoint"]["step"] if test_report else None)


def _evaluate_test(config, workdir, state, restore, run_eval) -> dict:
  """The held-out test split, once, with the checkpoint the analysis would load.

  Returns the test part of ``final_metrics.json``: ``test_checkpoint`` (step
  and why), ``test`` (its metrics), ``test_confidence_intervals`` (bootstrap
  over the test images) and ``test_at_last_step`` (the final parameters'
  metrics, or None where the chosen checkpoint is the last step).
  """
  which = config.evaluation.checkpoint
  step, why = runs.choose_checkpoint_step(workdir, which)
  if jax.process_count() > 1:
    # Host 0's choice, so that a file system seen late by another host cannot split them.
    step = int(multihost_utils.broadcast_one_to_all(np.int32(step)))
  last_step = int(state.step)
  variables = state.variables() if step == last_step else restore(step).variables()
  logging.info("test split: checkpoint step %d (%s: %s)", step, which, why)
  test_metrics, (labels, probabilities, mask), _ = run_eval(step, variables, "test", "test/")
  intervals = bootstrap.bootstrap_intervals(
      labels, probabilities, mask=mask, num_resamples=config.evaluation.bootstrap_resamples,
      seed=config.evaluation.bootstrap_seed, confidence=config.evaluation.confidence)
  logging.info("test split: %d%% bootstrap intervals (%d resamples): kappa [%.4f, %.4f] "
               "grade-1 recall [%.4f, %.4f] accuracy [%.4f, %.4f]",
               round(100 * intervals["confidence"]), intervals["num_resamples"],
               *intervals["intervals"]["quadratic_kappa"],
               *intervals["intervals"]["grade_1_recall"], *intervals["intervals"]["accuracy"])
  at_last_step = None
  if step != last_step:
    at_last_step, _, _ = run_eval(last_step, state.variables(), "test", "test_last_step/",
                                  label="test (last step, not the chosen checkpoint)")
    at_last_step = {"step": last_step, **at_last_step}
  return {"test_checkpoint": {"step": step, "selection": str(which), "why": why},
          "test": test_metrics, "test_confidence_intervals": intervals,
          "test_at_last_step": at_last_step}


def _check_and_log(pending, writer, config, total_steps, window_start, window_steps,
                   force_log=False, eta="?"):
  step, step_metrics = pending
  values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  if not np.isfinite(values["loss"]):
    raise NonFiniteLossError(
        f"training loss is {values['loss']} at step {step} (learning rate "
        f"{values['learning_rate']:g}); stopping. The last checkpoint is unaffected; lower the "
        f"learning rate or check the input data before resuming.")
  if not force_log:
    return
  elapsed = time.perf_counter() - window_start
  steps_per_s = window_steps / elapsed if elapsed > 0 else float("nan")
  values["steps_per_second"] = steps_per_s
  values["images_per_second"] = steps_per_s * config.batch_size
  writer.write(step + 1, values, prefix="train/")
  logging.info("step %d/%d loss %.4f acc %.3f lr %.2g | %.2f steps/s %.1f img/s | ETA %s",
               step + 1, total_steps, values["loss"], values["accuracy"],
               values["learning_rate"], steps_per_s, values["images_per_second"], eta)
