"""Config files of drig's binaries: ``--config=configs/NAME.py[:ARG]``.

Every config module declares ``ARGS``, a table {argument: one-line
description} of the arguments its ``get_config(arg)`` accepts ("" is the
default, no argument), and checks its argument with ``resolve_arg``, so an
unknown one is an error that lists the known ones. The binaries build the
config part of their ``--help`` from the same tables (``arguments_help``).
"""

import importlib
import textwrap

DEFAULT = ""  # the ARGS key of the config without an argument
_DEFAULT_ALIASES = (None, "", "default")
_WIDTH = 92


def resolve_arg(path: str, args: dict, arg) -> str:
  """``arg`` as a key of ``args`` ("" for the default), or a ValueError listing them.

  Args:
    path: the config file, for the message (e.g. "configs/base.py").
    args: the module's ARGS table.
    arg: what followed the colon in ``--config=FILE:ARG`` (None without one).
  """
  key = DEFAULT if arg in _DEFAULT_ALIASES else arg
  if key not in args:
    known = ", ".join(_label(k) for k in args)
    raise ValueError(f"unknown {path} argument {arg!r}; known: {known} (described in {path})")
  return key


def _label(key: str) -> str:
  return "(none)" if key == DEFAULT else key


def arguments_help(*names: str) -> str:
  """The arguments of ``configs/NAME.py`` for each name, as help text.

  Each file's one-line summary (its docstring's first line), then one line per
  argument from its ``ARGS`` table. The fields themselves are documented in
  the file.
  """
  lines = ["Configs (--config=FILE[:ARG]; each file documents its fields and runtimes):"]
  for name in names:
    module = importlib.import_module(f"configs.{name}")
    summary = (module.__doc__ or "").strip().splitlines()[0]
    lines.append(f"  configs/{name}.py  {summary}")
    width = max(len(_label(k)) for k in module.ARGS)
    for key, text in module.ARGS.items():
      lines.extend(textwrap.wrap(text, _WIDTH, initial_indent=f"    {_label(key):<{width}}  ",
                                 subsequent_indent=" " * (width + 6)))
  return "\n".join(lines)
