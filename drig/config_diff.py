"""What differs between a stored config and a new one, field by field.

Both binaries keep their config in their workdir and refuse to mix the
results of two configs there; they name the differing fields with this.
"""

from typing import Any, Iterator, Mapping


def flat_items(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """``(dotted.key, leaf)`` of a nested dict, keys sorted."""
  if isinstance(tree, Mapping):
    for key in sorted(tree):
      yield from flat_items(tree[key], f"{prefix}{key}.")
  else:
    yield prefix.rstrip("."), tree


def config_differences(old: Mapping, new: Mapping, *, ignore=(),
                       absent: Mapping | None = None) -> list[str]:
  """``"field: old -> new"`` for each leaf that differs, fields sorted.

  Args:
    old: the stored config, a nested dict (e.g. ``json.load``ed).
    new: the new config, a nested dict.
    ignore: dotted field names that may differ.
    absent: dotted field name -> the value that a field missing from ``old``
      stands for (a field added to the config after ``old`` was written, with
      the value that behaves as the code did before it existed).
  """
  old_flat, new_flat = dict(flat_items(old)), dict(flat_items(new))
  for field, value in (absent or {}).items():
    old_flat.setdefault(field, value)
  return [f"{k}: {old_flat.get(k, '<absent>')!r} -> {new_flat.get(k, '<absent>')!r}"
          for k in sorted(set(old_flat) | set(new_flat))
          if k not in ignore and old_flat.get(k) != new_flat.get(k)]
