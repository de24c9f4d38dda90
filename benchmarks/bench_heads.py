r"""Heads and losses side by side: test kappa, grade-1 recall and AUC over seeds.

Trains every variant (the poster's softmax cross-entropy, label smoothing,
class-balanced weights, focal loss, the ordinal head, the regression head with
kappa-fitted thresholds (squared error or smooth L1), test-time augmentation,
grade 1 oversampled in the balanced batches) with each seed, and reads each run's
``final_metrics.json``: the test split at the best checkpoint by validation
kappa, with its bootstrap 95% intervals. Prints, per variant, the mean and
standard deviation over seeds of test kappa, grade-1 recall and any-DR AUC,
and each run's intervals; writes the same to ``OUT/results.json`` and
``OUT/results.md``.

  python benchmarks/bench_heads.py --out=workdirs/bench_heads        # runlocal, 3 seeds
  python benchmarks/bench_heads.py --config_arg=tiny --seeds=0 \
      --variants=softmax_ce,ordinal --out=/tmp/bench_heads            # smoke run, minutes

Expected runtime: each runlocal run trains about 4-5 minutes on a 2-core CPU
(configs/base.py), so the default (11 variants x 3 seeds) takes about 2-2.5 hours
there, and minutes on an accelerator. Finished runs are reused: a variant's
workdir that already holds ``final_metrics.json`` is read, not retrained.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dotted config overrides of each variant (configs/base.py).
VARIANTS = {
    "softmax_ce": {},
    "label_smoothing_0.1": {"loss.label_smoothing": 0.1},
    "balanced_sqrt": {"loss.class_weight_power": 0.5},
    "balanced_full": {"loss.class_weight_power": 1.0},
    "focal_2": {"loss.name": "focal", "loss.focal_gamma": 2.0},
    "ordinal": {"model.head": "ordinal"},
    "ordinal_dihedral_tta": {"model.head": "ordinal",
                             "evaluation.test_time_augmentation": "dihedral"},
    "regression_mse": {"model.head": "regression"},
    "regression_smooth_l1": {"model.head": "regression", "loss.regression": "smooth_l1"},
    # Grade 1 at a quarter of each batch instead of the poster's 1/16 (grade 0 at 6/16, grade 4
    # at 3/16; the proportions sum to 16 so that the batch sizes still divide by them).
    "oversample_grade1": {"data.class_proportions": (6, 4, 2, 1, 3)},
    "regression_smooth_l1_oversample_grade1": {
        "model.head": "regression", "loss.regression": "smooth_l1",
        "data.class_proportions": (6, 4, 2, 1, 3)},
}
FIGURES = ("quadratic_kappa", "grade_1_recall", "auc_any_dr")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="folder for the runs' workdirs and results")
  parser.add_argument("--config_arg", default="runlocal", help="argument of configs/base.py")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="subset of " + ",".join(VARIANTS))
  parser.add_argument("--data_dir", default="", help="overrides config.data.data_dir")
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(",") if s]
  args.variants = [v for v in args.variants.split(",") if v]
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
  return args


def set_dotted(config, key, value):
  """Sets ``config.a.b = value`` for ``key`` "a.b"."""
  *parents, leaf = key.split(".")
  for parent in parents:
    config = getattr(config, parent)
  setattr(config, leaf, value)


def run_one(args, variant, seed) -> dict:
  """Trains (or reuses) one variant and seed; returns its final_metrics.json."""
  from configs import base as base_config  # pylint: disable=g-import-not-at-top
  from drig.training import trainer  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(args.out, f"{variant}_seed{seed}")
  path = os.path.join(workdir, "final_metrics.json")
  if not os.path.exists(path):
    config = base_config.get_config(args.config_arg)
    config.seed = seed
    if args.data_dir:
      config.data.data_dir = args.data_dir
    for key, value in VARIANTS[variant].items():
      set_dotted(config, key, value)
    trainer.train_and_evaluate(config, workdir)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _spread(values):
  values = [v for v in values if v == v]  # NaN: undefined on that run
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(results: dict) -> str:
  """A markdown table: mean ± standard deviation over seeds, then each run's intervals."""
  lines = ["| variant | seeds | test κ | grade-1 recall | AUC (any DR) |", "|---|---|---|---|---|"]
  for variant, runs in results.items():
    cells = [_spread([run["test"][name] for run in runs.values()]) for name in FIGURES]
    lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
  lines += ["", "Per run (test split at the chosen checkpoint; bootstrap 95% intervals):", ""]
  for variant, runs in results.items():
    for seed, run in runs.items():
      intervals = run["test_confidence_intervals"]["intervals"]
      parts = [f"{name} {run['test'][name]:.3f} [{intervals[name][0]:.3f}, "
               f"{intervals[name][1]:.3f}]" for name in FIGURES]
      lines.append(f"- {variant} seed {seed} (step {run['test_checkpoint']['step']}): "
                   + "; ".join(parts))
  return "\n".join(lines)


def main(argv):
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = {}
  for variant in args.variants:
    results[variant] = {}
    for seed in args.seeds:
      results[variant][seed] = run_one(args, variant, seed)
  table = summarise(results)
  print(table)
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"config_arg": args.config_arg, "seeds": args.seeds, "runs": results}, f, indent=2)
  with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"`python benchmarks/bench_heads.py --config_arg={args.config_arg} "
            f"--seeds={','.join(map(str, args.seeds))}`\n\n{table}\n")


if __name__ == "__main__":
  main(sys.argv[1:])
