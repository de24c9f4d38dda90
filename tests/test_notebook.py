"""examples/quickstart.ipynb runs top to bottom in a Jupyter kernel of this Python.

The notebook is executed with nbclient in a fresh ``python3`` kernel (ipykernel
from this environment), with DRIG_RUN and DRIG_PHOTO pointing at the same tiny
trained-run fixture and synthetic photograph that tests/test_readme_snippet.py
uses (built by tests/helpers.py).
"""

import json
import math
import os
import re
import sys

import pytest

import helpers  # tests/helpers.py

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")
AUROC_LINE = re.compile(r"pixel IG, mean pixel AUROC over the lesion types: (\S+)")
# Appended by the test only: what the kernel ran on and what the notebook computed.
PROBE = """import json, sys
print("PROBE " + json.dumps({"executable": sys.executable, "auroc": auroc,
                             "cwd": os.getcwd(), "run": RUN, "photo": PHOTO}))"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  run = tmp_path_factory.mktemp("run")
  helpers.write_trained_run(str(run))
  photo = helpers.write_fundus_photo(tmp_path_factory.mktemp("photo") / "fundus.jpg")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
  # The kernel inherits this process's environment; it draws with its inline backend.
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("DRIG_RUN", str(run))
    patch.setenv("DRIG_PHOTO", photo)
    patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    patch.delenv("MPLBACKEND", raising=False)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": REPO}})
    client.execute()
  return notebook, str(run), photo


def _stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", ())
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_the_notebook_has_no_outputs_and_reads_its_paths_from_the_environment():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code)
  first = code[0].source
  assert 'os.environ.get("DRIG_RUN", "workdirs/runlocal")' in first
  assert 'os.environ.get("DRIG_PHOTO", "fundus.jpg")' in first


def test_notebook_runs_in_this_python_and_scores_the_lesions(executed):
  notebook, run, photo = executed
  errors = [o for c in notebook.cells for o in c.get("outputs", ()) if o.output_type == "error"]
  assert not errors, errors
  probe = json.loads(_stdout(notebook.cells[-1]).split("PROBE ", 1)[1])
  assert os.path.realpath(probe["executable"]) == os.path.realpath(sys.executable)
  assert (probe["run"], probe["photo"], probe["cwd"]) == (run, photo, REPO)

  printed = "".join(_stdout(c) for c in notebook.cells)
  match = AUROC_LINE.search(printed)
  assert match, printed[-2000:]
  auroc = float(match.group(1))
  assert math.isfinite(auroc) and 0.0 <= auroc <= 1.0
  assert abs(auroc - probe["auroc"]) < 1e-3
  assert "pointing game" in printed and "random" in printed

  # The two figure cells each drew one figure of two panels.
  images = [o for c in notebook.cells for o in c.get("outputs", ())
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) == 2
