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
