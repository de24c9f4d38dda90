"""A drig training workdir read back: its config, kept checkpoints and best step.

``python -m drig.train --workdir=W`` leaves ``W/config.json`` (the run's
config), ``W/checkpoints/<step>/`` (the kept checkpoints) and
``W/metrics.jsonl`` (one JSON record per evaluation). ``load_run(W)``
rebuilds the model and restores the checkpoint of the chosen step: "best"
(highest validation kappa among the kept checkpoints), "latest" or a number.

Example::

  run = load_run("workdirs/base")
  logits = run.model.apply(run.variables, images, train=False)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from drig.models import checkpoints
from drig.models import classifier
from drig.models.weight_files import WeightImportError

KAPPA_KEY = "val/quadratic_kappa"


class RunError(ValueError):
  """A training workdir that cannot be read or restored; says what is wrong."""


class StepNotKeptError(RunError):
  """The requested checkpoint step is not one of the kept ones."""


@dataclasses.dataclass
class Run:
  """A restored training run.

  Attributes:
    model: the DR classifier its config describes.
    variables: {"params", "batch_stats"} of the restored step.
    model_config: the run's model section, a ConfigDict.
    training_config: the run's whole config.json, a dict.
    step: the restored step.
    why: why that step ("best validation kappa 0.7312", "latest", ...).
  """
  model: Any
  variables: dict
  model_config: ml_collections.ConfigDict
  training_config: dict
  step: int
  why: str


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """Committed steps of a CheckpointManager directory, ascending; [] if it is absent."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(e) for e in os.listdir(checkpoint_dir)
                if e.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, e)))


def kappa_by_step(workdir: str) -> dict[int, float]:
  """Validation kappa per step from the run's metrics.jsonl (the last record wins)."""
  path = os.path.join(workdir, "metrics.jsonl")
  kappas = {}
  if not os.path.exists(path):
    return kappas
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a crash
      if KAPPA_KEY in record:
        kappas[int(record["step"])] = float(record[KAPPA_KEY])
  return kappas


def choose_checkpoint_step(workdir: str, which: str) -> tuple[int, str]:
  """The step to restore from a training workdir, and why.

  Args:
    workdir: a drig training workdir.
    which: "best": the kept checkpoint with the highest validation kappa (from
      metrics.jsonl; the trainer keeps the best one by kappa), else the
      latest; "latest"; or a step number.

  Returns:
    (step, why).

  Raises:
    RunError: the workdir has no checkpoints.
    StepNotKeptError: ``which`` is neither "best", "latest" nor a kept step.
  """
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  steps = checkpoint_steps(checkpoint_dir)
  if not steps:
    raise RunError(f"no checkpoints in {checkpoint_dir}; is it a drig training workdir "
                   "(python -m drig.train --workdir=...)?")
  which = str(which).strip()
  if which == "latest":
    return steps[-1], "latest"
  if which == "best":
    kappas = kappa_by_step(workdir)
    scored = [(kappas[s], s) for s in steps if s in kappas]
    if scored:
      kappa, step = max(scored)
      return step, f"best validation kappa {kappa:.4f}"
    return steps[-1], "latest (no validation kappa recorded for the kept checkpoints)"
  if which.isdigit() and int(which) in steps:
    return int(which), "config.checkpoint_step"
  raise StepNotKeptError(f"use 'best', 'latest' or one of the kept steps {steps} of "
                         f"{checkpoint_dir}")


def load_run(workdir: str, which: str = "best") -> Run:
  """The model of a training workdir with the weights of the chosen step.

  Args:
    workdir: a drig training workdir (python -m drig.train --workdir).
    which: the step, as for ``choose_checkpoint_step``.

  Raises:
    RunError: no config.json, a config without a model section, no
      checkpoints, or a checkpoint that cannot be restored.
    StepNotKeptError: ``which`` names no kept step.
  """
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise RunError(f"{config_path} not found; point it at a drig training workdir "
                   "(python -m drig.train --workdir)")
  try:
    with open(config_path, encoding="utf-8") as f:
      training_config = json.load(f)
    model_config = ml_collections.ConfigDict(training_config["model"])
  except (json.JSONDecodeError, KeyError) as e:
    raise RunError(f"{config_path}: not a drig training config ({e})") from e
  step, why = choose_checkpoint_step(workdir, which)
  model = classifier.build_model(model_config)
  try:
    variables = checkpoints.load_drig_checkpoint(os.path.join(workdir, "checkpoints"), step)
  except WeightImportError as e:
    raise RunError(str(e)) from e
  return Run(model, variables, model_config, training_config, step, why)
