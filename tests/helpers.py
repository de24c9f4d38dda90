"""Small helpers shared by the test modules and tests/multiprocess_worker.py."""


def apply_overrides(config, overrides):
  """Sets {"dotted.key": value} on an ml_collections config (lists become tuples), then locks it."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = tuple(value) if isinstance(value, list) else value
  config.lock()
  return config


def flatten(tree, prefix=""):
  """{"a/b/c": leaf} from nested dicts."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}/"))
    return out
  return {prefix.rstrip("/"): tree}


def write_trained_run(run_dir, seed=0):
  """A drig.train-like workdir of the tiny model in ``run_dir``: config.json and checkpoints/.

  The variables are random of the right shapes (`random_variables`), filled
  with numpy: model.init would compile the whole network only to be
  overwritten. Returns (variables, image size). Shared by the README-snippet
  and notebook tests.
  """
  import os  # pylint: disable=g-import-not-at-top
  from configs import base as base_config  # pylint: disable=g-import-not-at-top
  from drig.models import checkpoints, classifier  # pylint: disable=g-import-not-at-top

  config = base_config.get_config("tiny")
  with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  model = classifier.build_model(config.model)
  size = config.data.image_size
  variables = random_variables(model, size, seed)
  checkpoints.save_variables(os.path.join(run_dir, "checkpoints"), variables)
  return variables, size


def random_variables(model, size, seed=0):
  """Random variables of ``model`` for size x size inputs, filled with numpy.

  He-scaled kernels (activations stay of order 1), BatchNorm variances in
  [0.5, 1.5] and scales in [0.8, 1.2], everything else N(0, 0.1).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def write_fundus_photo(path, seed=3, grade=3, size=256):
  """A synthetic fundus photograph of ``grade`` written as a JPEG at ``path``."""
  from drig.data import synthetic_examples  # pylint: disable=g-import-not-at-top
  from drig.data import synthetic_fundus  # pylint: disable=g-import-not-at-top
  image, _ = synthetic_fundus.render_fundus(seed, grade=grade, size=size)
  with open(path, "wb") as f:
    f.write(synthetic_examples.encode_jpeg(image, 92))
  return str(path)


def subprocess_env(cache_dir):
  """The environment of a binary run by a test: CPU, quiet TF, a persistent compilation cache.

  The cache is the test process's own (tests/conftest.py) where it has one, so the
  binary reuses what the tests compiled; else ``cache_dir``.
  """
  import os  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def tensorboard_events(directory):
  """Every scalar, image and tensor of the TensorBoard events in ``directory``."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0,
                                event_accumulator.TENSORS: 0})
  events.Reload()
  return events


def decode_image_event(image_event):
  """The pixels of a TensorBoard image event; its recorded size must be the PNG's."""
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  pixels = cv2.imdecode(np.frombuffer(image_event.encoded_image_string, np.uint8),
                        cv2.IMREAD_UNCHANGED)
  assert pixels is not None
  assert (image_event.height, image_event.width) == pixels.shape[:2]
  return pixels


def write_tiny_analysis_run(root):
  """The tiny synthetic data set under ``root``/tfds and a drig.train workdir ``root``/train
  whose step-3 checkpoint holds write_trained_run's random weights. Returns the workdir."""
  import os  # pylint: disable=g-import-not-at-top
  from configs import base as base_config  # pylint: disable=g-import-not-at-top
  from drig.data import datasets  # pylint: disable=g-import-not-at-top
  from drig.models import checkpoints  # pylint: disable=g-import-not-at-top

  root = str(root)
  train_config = base_config.get_config("tiny")
  train_config.data.data_dir = os.path.join(root, "tfds")
  datasets.load_builder_from_config(train_config.data)
  weights, train_dir = os.path.join(root, "weights"), os.path.join(root, "train")
  os.makedirs(weights)
  variables, _ = write_trained_run(weights)
  checkpoints.save_variables(os.path.join(train_dir, "checkpoints", "3", "default"), variables)
  with open(os.path.join(train_dir, "config.json"), "w", encoding="utf-8") as f:
    f.write(train_config.to_json_best_effort(indent=2))
  return train_dir
