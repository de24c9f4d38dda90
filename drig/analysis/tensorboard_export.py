"""The analysis job's summary scalars and figures as TensorBoard events (host 0).

``write_analysis`` puts every number of the report's metrics (``metrics.json``,
nested entries flattened to ``analysis/<key>/<sub key>``) and every PNG figure
(``figures/<name>``) into ``<workdir>/tensorboard``, at the step of the
checkpoint analysed, so ``tensorboard --logdir`` over training and analysis
workdirs shows both.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from drig.training import metric_writer as metric_writer_lib


def scalar_items(metrics: Mapping, prefix: str = "analysis/") -> dict[str, float]:
  """{tag: value} of the finite numbers in ``metrics``, nested mappings flattened with "/".

  Booleans, strings, lists and None are left out: a scalar chart shows numbers.
  """
  out = {}
  for key, value in metrics.items():
    if isinstance(value, Mapping):
      out.update(scalar_items(value, f"{prefix}{key}/"))
    elif (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value)):
      out[f"{prefix}{key}"] = float(value)
  return out


def write_analysis(workdir: str, metrics: Mapping, figures: Sequence[str], *,
                   step: int = 0) -> None:
  """Writes ``metrics``' numbers and the PNG ``figures`` to ``workdir/tensorboard``.

  Args:
    workdir: the analysis workdir.
    metrics: the report's metrics (what ``metrics.json`` holds).
    figures: paths of the figures; PNG files are written, others skipped.
    step: the training step of the checkpoint analysed.

  Raises:
    OSError: a figure file cannot be read (naming it).
  """
  writer = metric_writer_lib.MetricWriter(workdir, jsonl=False)
  try:
    writer.write(step, scalar_items(metrics))
    for path in figures:
      if not path.lower().endswith(".png"):
        continue
      with open(path, "rb") as f:
        png = f.read()
      name = os.path.splitext(os.path.relpath(path, os.path.join(workdir, "figures")))[0]
      writer.write_image(step, f"figures/{name}", png)
  finally:
    writer.close()
