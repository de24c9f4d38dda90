"""The shape of the code base: no import cycles, modules of one concept, no development history.

These read the source files only (nothing is imported), so they run in
milliseconds and fail with the offending modules named.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "drig")
MAX_LINES = 500
ONE_CONCEPT = "One concept:"

# Words that narrate how the code came to be rather than what it is.
HISTORY_MARKERS = re.compile(
    r"\bsessions? \d|\bround \d|\bissue \d|\bissues \d|\bissue #|#\d{1,3}\b(?![0-9a-f])|"
    r"measured today|\btoday\b|earlier runs? had|earlier we|previous session|"
    r"this session|\bsession-\d",
    re.IGNORECASE)


def _modules() -> dict[str, str]:
  """{dotted module name: path} for every .py file under drig/."""
  modules = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        modules[".".join(parts)] = path
  return modules


def _imported_modules(path: str, module: str, known: set[str]) -> set[str]:
  """drig modules that ``path`` imports anywhere (top level or inside functions)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      # `from drig.x import y` imports drig.x.y when y is a module, else names of drig.x.
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
               for alias in node.names]
    else:
      continue
    for name in names:
      # `import drig.a.b` needs drig.a.b; count the deepest drig module named.
      while name and name not in known:
        name = name.rpartition(".")[0]
      if name and name != module and name != "drig":
        found.add(name)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  known = set(modules)
  return {m: _imported_modules(p, m, known) for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in graph.get(node, ()):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_relative_and_lazy_imports(tmp_path):
  package = tmp_path / "pkg"
  package.mkdir()
  source = package / "mod.py"
  source.write_text("from drig import grading\n"
                    "def f():\n  from drig.attribution import integration\n")
  found = _imported_modules(str(source), "drig.analysis.mod", set(_modules()))
  assert found == {"drig.grading", "drig.attribution.integration"}


def test_drig_has_no_import_cycles():
  cycles = _cycles(import_graph())
  assert not cycles, "import cycles among drig modules: " + "; ".join(
      " <-> ".join(c) for c in cycles)


def test_long_modules_say_which_one_concept_they_hold():
  offenders = []
  for module, path in sorted(_modules().items()):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    lines = text.count("\n")
    if lines > MAX_LINES:
      docstring = ast.get_docstring(ast.parse(text)) or ""
      if ONE_CONCEPT not in docstring:
        offenders.append(f"{module} ({lines} lines)")
  assert not offenders, (f"modules over {MAX_LINES} lines whose docstring does not name their "
                         f"one concept ('{ONE_CONCEPT} ...'): {', '.join(offenders)}")


def _text_files():
  roots = ["drig", "configs", "launch", "benchmarks", "tests", "docs", "examples"]
  yield os.path.join(REPO, "README.md")
  for root in roots:
    for folder, _, files in os.walk(os.path.join(REPO, root)):
      if "__pycache__" in folder:
        continue
      for name in files:
        if name.endswith((".py", ".md", ".sh", ".sbatch", ".ipynb", ".txt")):
          yield os.path.join(folder, name)


def test_history_marker_pattern():
  for text in ("as in session 4", "issue 2's target", "round 3 of the work", "measured today",
               "see #12"):
    assert HISTORY_MARKERS.search(text), text
  for text in ("the disc's 10% rim", "step 400 of 1395", "batch of 16 (8:1:2:1:4)",
               "colour #1f77b4", "reused from an earlier run with --workdir"):
    assert not HISTORY_MARKERS.search(text), text


def test_no_development_history_in_code_and_docs():
  this_file = os.path.abspath(__file__)
  hits = []
  for path in _text_files():
    if os.path.abspath(path) == this_file:
      continue
    with open(path, encoding="utf-8", errors="replace") as f:
      for number, line in enumerate(f, 1):
        match = HISTORY_MARKERS.search(line)
        if match:
          hits.append(f"{os.path.relpath(path, REPO)}:{number}: {match.group(0)!r}")
  assert not hits, ("development history in code or docs (say what is, not how it came to "
                    f"be): {len(hits)} lines, e.g. " + "; ".join(hits[:15]))


if __name__ == "__main__":
  raise SystemExit(pytest.main([__file__, "-q"]))
