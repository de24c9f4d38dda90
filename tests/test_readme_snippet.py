"""The README's "Notebook use" snippet runs as written, and importing drig has no side effects.

The snippet is read from README.md between the notebook-snippet markers and
executed verbatim, except its one ``RUN, PHOTO = ...`` line, which points at a
tiny trained-run fixture (config.json + a drig checkpoint of the tiny model)
and a synthetic fundus photograph written as JPEG, both from tests/helpers.py
(tests/test_notebook.py runs the example notebook on the same fixtures).
"""

import json
import os
import re
import subprocess
import sys

import jax
import matplotlib
import numpy as np
import pytest

from drig import preprocess
import helpers  # tests/helpers.py

matplotlib.use("Agg")  # no display; before the snippet imports pyplot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
START, END = "<!-- notebook-snippet:start -->", "<!-- notebook-snippet:end -->"
PATHS_LINE = re.compile(r"^RUN, PHOTO = .*$", re.MULTILINE)


def readme_snippet() -> str:
  """The one ```python block between the markers, verbatim."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  assert text.count(START) == 1 and text.count(END) == 1, "snippet markers missing in README.md"
  section = text[text.index(START) + len(START):text.index(END)]
  blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
  assert len(blocks) == 1, f"expected one python block in the section, found {len(blocks)}"
  return blocks[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A drig.train-like workdir: config.json and a checkpoint of the tiny model."""
  run = tmp_path_factory.mktemp("run")
  variables, size = helpers.write_trained_run(str(run))
  return str(run), variables, size


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  return helpers.write_fundus_photo(tmp_path_factory.mktemp("photo") / "fundus.jpg")


def test_snippet_runs_as_written(trained_run, photo):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  run, saved_variables, size = trained_run
  code = readme_snippet()
  assert len(PATHS_LINE.findall(code)) == 1, "the snippet must set RUN, PHOTO in one line"
  code = PATHS_LINE.sub(lambda _: f"RUN, PHOTO = {run!r}, {photo!r}", code)
  namespace = {"__name__": "readme_snippet"}
  plt.close("all")
  exec(compile(code, "README.md:notebook-snippet", "exec"), namespace)  # pylint: disable=exec-used

  # It loaded the saved weights and preprocessed the photograph at the run's size.
  for got, want in zip(jax.tree.leaves(namespace["variables"]), jax.tree.leaves(saved_variables)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(namespace["image"], preprocess.preprocess_file(photo, size=size))
  pixels, gap = np.asarray(namespace["pixels"]), np.asarray(namespace["gap"])
  assert pixels.shape == (1, size, size, 3) and np.all(np.isfinite(pixels))
  assert gap.shape == (1,) and np.isfinite(gap).all()
  assert np.abs(pixels).max() > 0
  resultant = np.asarray(namespace["lesions"].positive_resultant)
  assert resultant.shape == (1, size, size, 3) and np.all(np.isfinite(resultant))
  # Two heat maps were drawn, each an RGB image of the input's size.
  fig = namespace["fig"]
  images = [ax.get_images() for ax in fig.axes if ax.get_images()]
  assert len(images) == 2
  for (drawn,) in images:
    assert drawn.get_array().shape == (size, size, 3)
  plt.close("all")


_IMPORT_CHECK = """
import json, logging, sys
root = logging.getLogger()
before = (list(root.handlers), root.level)
import drig, drig.attribution, drig.models, drig.analysis, drig.preprocess
import drig.attribution.heatmap, drig.models.inception_v3, drig.models.classifier
import drig.models.importer, drig.models.layer_access, drig.models.checkpoints, drig.grading
from jax._src import xla_bridge
print(json.dumps(dict(
    tensorflow=sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")),
    handlers_changed=(list(root.handlers), root.level) != before,
    absl_handler_on_root=any(type(h).__name__ == "ABSLHandler" for h in root.handlers),
    backends_initialized=xla_bridge.backends_are_initialized(),
    backends=sorted(xla_bridge._backends))))
"""


def test_importing_drig_has_no_side_effects():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", _IMPORT_CHECK], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False, timeout=300)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == dict(tensorflow=[], handlers_changed=False, absl_handler_on_root=False,
                        backends_initialized=False, backends=[]), report
