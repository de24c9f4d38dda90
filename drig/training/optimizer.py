"""Optimizers and the poster's step-wise learning-rate schedule."""

import optax


def learning_rate_schedule(values, steps) -> optax.Schedule:
  """A piecewise-constant schedule: ``values[i]`` for ``steps[i]`` steps each.

  The poster's recipe is ``values=(1e-3, 2e-4, 5e-5)``, ``steps=(550, 350, 495)``.
  After the last phase the last value holds.
  """
  values, steps = tuple(values), tuple(steps)
  if not values or len(values) != len(steps):
    raise ValueError(f"schedule needs one step count per value, got values={values} steps={steps}")
  if any(s <= 0 for s in steps):
    raise ValueError(f"schedule step counts must be positive, got {steps}")
  schedules = [optax.constant_schedule(v) for v in values]
  boundaries, total = [], 0
  for s in steps[:-1]:
    total += s
    boundaries.append(total)
  return optax.join_schedules(schedules, boundaries)


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Builds the optimizer named by ``config.name``.

  Supported: ``adam`` (default), ``adamw``, ``sgd`` (with ``momentum``, optional
  Nesterov) and ``rmsprop``. ``grad_clip_norm`` > 0 clips the global norm first.
  """
  name = config.name
  if name == "adam":
    opt = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  elif name == "adamw":
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=config.weight_decay)
  elif name == "sgd":
    opt = optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)
  elif name == "rmsprop":
    opt = optax.rmsprop(schedule, decay=config.rmsprop_decay, eps=config.eps,
                        momentum=config.momentum)
  else:
    raise ValueError(f"unknown optimizer {name!r}; choose adam, adamw, sgd or rmsprop")
  if config.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
  return opt
