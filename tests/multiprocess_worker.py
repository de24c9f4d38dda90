r"""One process of a (possibly multi-process) drig job on CPU, for tests/test_multiprocess.py.

  python tests/multiprocess_worker.py train --process_id=0 --num_processes=2 --port=12345 \
      --local_devices=2 --data_dir=DIR --workdir=DIR --out=DIR

Sets the fake CPU device count before JAX is imported, starts JAX's
multi-controller runtime through ``drig.runtime.setup_process`` (the same path
as the binaries: DRIG_COORDINATOR_ADDRESS / DRIG_NUM_PROCESSES /
DRIG_PROCESS_ID), runs drig's library call and writes this process's view of
the results to ``--out``. Not a test module itself (pytest does not collect it).
"""

import argparse
import json
import os
import sys

import numpy as np

import helpers  # tests/helpers.py: this script's folder is on sys.path


def _parse(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train", "analyze"])
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--local_devices", type=int, default=1)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--x64", action="store_true", help="Enable jax_enable_x64 (float64 models).")
  parser.add_argument("--overrides", default="{}",
                      help="JSON {dotted.key: value} applied to the config.")
  return parser.parse_args(argv)


def _configure(config, data_dir, overrides):
  config.data.data_dir = data_dir
  return helpers.apply_overrides(config, overrides)


def main(argv):
  args = _parse(argv)
  # Must precede the first import of jax (drig.runtime imports it lazily).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.local_devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  distributed = "no"
  if args.num_processes > 1:
    os.environ["DRIG_COORDINATOR_ADDRESS"] = f"localhost:{args.port}"
    os.environ["DRIG_NUM_PROCESSES"] = str(args.num_processes)
    os.environ["DRIG_PROCESS_ID"] = str(args.process_id)
    distributed = "auto"  # must detect the coordinator variables by itself
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  # Everything that imports jax is imported only now, after the environment above.
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  from drig import runtime  # pylint: disable=g-import-not-at-top
  runtime.setup_process(distributed)
  import jax  # pylint: disable=g-import-not-at-top
  if args.x64:
    jax.config.update("jax_enable_x64", True)
  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.process_index() == args.process_id, jax.process_index()
  assert jax.local_device_count() == args.local_devices, jax.local_devices()
  os.makedirs(args.out, exist_ok=True)
  overrides = json.loads(args.overrides)

  if args.mode == "train":
    from configs import base  # pylint: disable=g-import-not-at-top
    from drig import parallel  # pylint: disable=g-import-not-at-top
    from drig.training import trainer  # pylint: disable=g-import-not-at-top
    config = _configure(base.get_config("tiny"), args.data_dir, overrides)
    result = trainer.train_and_evaluate(config, args.workdir)
    variables = parallel.to_host(result.state.variables())
    arrays = {k: np.asarray(v) for k, v in helpers.flatten(jax.tree.map(np.asarray, variables)).items()}
    np.savez(os.path.join(args.out, f"variables_{args.process_id}.npz"), **arrays)
    summary = {"step": int(result.state.step), "process_count": jax.process_count(),
               "device_count": jax.device_count(),
               "mesh_device_ids": [d.id for d in parallel.data_mesh().devices.flat],
               "mesh_process_ids": [d.process_index for d in parallel.data_mesh().devices.flat],
               "validation": result.eval_metrics, "test": result.test_metrics}
  else:
    from configs import analyze  # pylint: disable=g-import-not-at-top
    from drig.analysis import job  # pylint: disable=g-import-not-at-top
    config = _configure(analyze.get_config("tiny"), args.data_dir, overrides)
    job.run_analysis(config, args.workdir)
    summary = {"process_count": jax.process_count(), "device_count": jax.device_count()}
  with open(os.path.join(args.out, f"summary_{args.process_id}.json"), "w",
            encoding="utf-8") as f:
    json.dump(summary, f, default=float)
  print("WORKER_DONE", args.process_id, flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
