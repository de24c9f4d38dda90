"""A model's variables before training: random, then optionally from a weight file.

* ``init_rngs``: the keys of a run's initialisation, named from its root key.
* ``init_variables``: ``model.init`` with the caller's keys, compiled
  unoptimised (training derives the keys from its root key, so a resumed or
  repeated run gets the same variables bit for bit).
* ``random_variables``: ``model.init`` from an integer seed, cheap to compile
  and cached per (model, input shape), for checks that only need fresh
  weights of the right distribution (the model-randomisation sanity check).
* ``initial_variables``: random initialisation, overwritten from a weight file
  when ``source`` is not "random" (``importer.initialise_from``), with a
  human-readable report of what came from where. Initialisation is never
  silent.
* ``check_weight_source``: fails fast, before any data are generated, when
  the weight file is missing, saying what to download.
"""

import functools
import os
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp

from drig import prng
from drig.models import importer

# A size of at least 75 px runs every Inception-v3 layer; parameter shapes do not
# depend on it (global average pooling), so the smallest is the cheapest init.
DEFAULT_INIT_SHAPE = (1, 75, 75, 3)


def init_rngs(root_key: jax.Array) -> dict:
  """The keys of a run's random initialisation, derived from its root key by name."""
  return {"params": prng.named_key(root_key, "init"),
          "dropout": prng.named_key(root_key, "init_dropout")}

WEIGHT_DOWNLOADS = {
    "keras_h5": ("Keras' ImageNet Inception-v3 weights, e.g. "
                 "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "keras3": "a Keras 3 InceptionV3 .weights.h5 file (model.save_weights)",
    "torchvision": ("torchvision's inception_v3 ImageNet state dict, e.g. "
                    "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"),
    "drig": "a drig checkpoint directory (a training workdir or python -m drig.import_weights)",
}


def init_variables(model, rngs: dict, input_shape: Sequence[int]) -> dict:
  """``model.init(rngs, zeros(input_shape), train=False)`` as plain nested dicts.

  Args:
    model: a Flax module taking (x, train=...), e.g. a DRClassifier.
    rngs: the init keys, e.g. {"params": key, "dropout": key}.
    input_shape: the dummy input's shape, e.g. (1, 299, 299, 3).

  Returns:
    {"params": ..., "batch_stats": ...} of jax arrays.
  """
  dummy = jnp.zeros(tuple(input_shape), jnp.float32)
  # Inception-v3 has 94 random initialisers; XLA's optimisation passes gain nothing
  # on a program that runs once and cost 3x the compile time (33 s -> 10 s for the
  # tiny model on 2 cores), so compile it unoptimised.
  init = jax.jit(functools.partial(model.init, train=False)).lower(rngs, dummy).compile(
      compiler_options={"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True})
  return flax.core.unfreeze(init(rngs, dummy))


def compiled_per_model(build: Callable) -> Callable:
  """``build(model, *args)`` (which returns a jitted function), memoised per (model, args).

  Flax modules are frozen dataclasses, hashable when their fields are; an
  unhashable one gets a fresh compiled function on every call.
  """
  cached = functools.lru_cache(maxsize=8)(build)

  def get(model, *args):
    try:
      hash(model)
    except TypeError:
      return build(model, *args)
    return cached(model, *args)
  return get


@compiled_per_model
def _compiled_init(model, shape):
  def init(key):
    return model.init({"params": key, "dropout": key}, jnp.zeros(shape, jnp.float32),
                      train=False)
  # One compiled program (XLA prunes the forward pass, whose output init drops).
  return jax.jit(init)


def random_variables(model, seed: int, *, input_shape: Optional[Sequence[int]] = None) -> dict:
  """``model.init``'s variables for ``seed``, as plain nested dicts.

  The key is ``jax.random.key(seed, impl="unsafe_rbg")``: Flax derives one key
  per parameter by splitting, and with the default threefry keys XLA:CPU takes
  about 8x longer to compile Inception-v3's initialisation (184 s against 22 s
  for the tiny model on a loaded 2-core machine). The bits differ from a
  threefry key's but have the same distributions, which is all a
  randomisation check needs. The compiled init is cached per (model, shape).

  Args:
    model: a Flax module taking (x, train=...), e.g. a DRClassifier.
    seed: an int; the same seed gives the same variables on the same backend.
    input_shape: the dummy input's shape, default DEFAULT_INIT_SHAPE.

  Returns:
    {"params": ..., "batch_stats": ...} of jax arrays.
  """
  shape = tuple(int(d) for d in (input_shape or DEFAULT_INIT_SHAPE))
  init = _compiled_init(model, shape)
  return flax.core.unfreeze(init(jax.random.key(int(seed), impl="unsafe_rbg")))


def check_weight_source(source: str, path: Optional[str]) -> None:
  """Raises unless ``source`` is "random" or names a weight file that exists at ``path``.

  Args:
    source: "random" or a key of WEIGHT_DOWNLOADS (``importer.SOURCES``).
    path: the weight file or checkpoint directory; unused for "random".

  Raises:
    ValueError: ``source`` is unknown.
    FileNotFoundError: the weights are absent; the message says what to
      download and where to put it.
  """
  if source == "random":
    return
  if source not in WEIGHT_DOWNLOADS:
    raise ValueError(f"config.init.source must be random or one of {sorted(WEIGHT_DOWNLOADS)}, "
                     f"got {source!r}")
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
        f"initial weights not found: config.init.path={path!r} (source {source!r}). Download "
        f"{WEIGHT_DOWNLOADS[source]} on a machine with internet access and put it at "
        f"{path or '<config.init.path>'}, or set --config.init.path.")


def initial_variables(model, model_config, *, rngs: dict, image_size: int, source: str,
                      path: Optional[str]) -> tuple[dict, Any]:
  """Random initialisation, optionally overwritten from a weight file.

  Args:
    model: the model ``model_config`` describes (``classifier.build_model``).
    model_config: its config section (the file's convention is checked
      against ``model_config.convention``).
    rngs: the init keys, {"params": key, "dropout": key}.
    image_size: side of the square input images.
    source: "random" or one of ``importer.SOURCES``.
    path: the weight file or checkpoint directory (unused for "random").

  Returns:
    (variables, report): plain nested dicts, and a human-readable report
    (``str(report)``; an ``importer.ImportReport`` after an import) of what
    was imported and what was freshly initialised.

  Raises:
    weight_files.WeightImportError: the file does not fit the model.
  """
  variables = init_variables(model, rngs, (1, image_size, image_size, 3))
  if source == "random":
    return variables, "all parameters randomly initialised (config.init.source='random')"
  return importer.initialise_from(variables, source=source, path=path, model_config=model_config)
