r"""The lesion study's cost per image: each method's map, its scores and its faithfulness curves.

Loads the study config's grader (``configs/analyze.py:study_local`` by default,
i.e. the demo's runlocal run) and its first analysed images, and times, per
image, on one batch of ``--images`` images (one shard):

* each method of the config: pixel IG as the job computes it (with the layer IG
  and the active regions, ``lesion_detection`` at the config's steps or
  tolerance) and every other method through ``drig.attribution.methods`` with
  the job's options;
* the localisation scores of one map against the image's masks (numpy);
* one map's deletion and insertion curves (``config.study.faithfulness_points``
  fractions).

Each timed call runs after one untimed call (compilation), best of
``--repeats``. ``--full_run=DIR`` also runs the whole job into DIR (removed
first) and prints its wall time.

  python benchmarks/bench_study.py --checkpoint=workdirs/runlocal
  python benchmarks/bench_study.py --checkpoint=workdirs/runlocal --full_run=/tmp/study_local
"""

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config_arg", default="study_local", help="argument of configs/analyze.py")
  parser.add_argument("--checkpoint", default="", help="overrides config.checkpoint")
  parser.add_argument("--images", type=int, default=4, help="images per timed batch")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls (best is kept)")
  parser.add_argument("--full_run", default="", help="also time the whole job into this folder")
  return parser.parse_args(argv)


def best_time(fn, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls of fn, after one untimed call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import analyze as analyze_config  # pylint: disable=g-import-not-at-top
  from drig import grading  # pylint: disable=g-import-not-at-top
  from drig import preprocess  # pylint: disable=g-import-not-at-top
  from drig.analysis import attributor as attributor_lib  # pylint: disable=g-import-not-at-top
  from drig.analysis import faithfulness  # pylint: disable=g-import-not-at-top
  from drig.analysis import images as images_lib  # pylint: disable=g-import-not-at-top
  from drig.analysis import job  # pylint: disable=g-import-not-at-top
  from drig.analysis import localization  # pylint: disable=g-import-not-at-top
  from drig.analysis import model_source  # pylint: disable=g-import-not-at-top
  from drig.analysis import study_scores  # pylint: disable=g-import-not-at-top
  from drig.analysis.quantity_specs import make_quantity, parse_quantity  # pylint: disable=g-import-not-at-top
  from drig.attribution import baselines  # pylint: disable=g-import-not-at-top
  from drig.attribution import layer as layer_lib  # pylint: disable=g-import-not-at-top
  from drig.attribution import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from drig.attribution import regions  # pylint: disable=g-import-not-at-top

  config = analyze_config.get_config(args.config_arg)
  if args.checkpoint:
    config.checkpoint = args.checkpoint
  loaded = model_source.load_model(config)
  image_set = images_lib.load_images(config, loaded)
  examples = [image_set.read(i) for i in range(args.images)]
  x = grading.to_model_input(np.stack([e.image for e in examples]))
  n, size = x.shape[0], x.shape[1]
  logits_fn = model_source.ModelLogits(loaded.model, loaded.variables)
  predictions = np.asarray(attributor_lib.probabilities(logits_fn, x)).argmax(-1)
  spec = parse_quantity(config.quantities[0])
  quantity = make_quantity(spec, logits_fn, predictions)
  to_layer, from_layer = layer_lib.split_model(loaded.model, loaded.variables, config.layer)
  layer_quantity = make_quantity(spec, from_layer, predictions)
  key = jax.random.PRNGKey(config.seed)
  baseline = baselines.resolve_baseline(config.baseline, x, key=key)
  chunk = attributor_lib.path_chunk(config.chunk_size, config.steps, n)
  print(f"{args.config_arg}: {loaded.description}; {n} images of {size} px, "
        f"{jax.devices()[0].platform}, best of {args.repeats}")

  rows = []

  def pixel_ig():
    analysis = regions.lesion_detection(
        to_layer, layer_quantity, x, baseline, k=config.top_k, by=config.neurons,
        individual_regions=False, **attributor_lib.integration_arguments(config, chunk))
    return jax.block_until_ready(analysis.pixels)

  maps = {"integrated_gradients": np.asarray(pixel_ig())}
  rows.append(("integrated_gradients (+ layer IG, active regions)", best_time(pixel_ig, args.repeats)))
  for name in config.methods:
    if name == "integrated_gradients" or methods_lib.METHODS[name].distribution:
      continue

    def run(name=name):
      return jax.block_until_ready(methods_lib.attribute(
          name, quantity=quantity, x=x, baseline=baseline, key=key,
          split_model=(to_layer, layer_quantity),
          options=attributor_lib.job_method_options(config, name)))
    maps[name] = np.asarray(run())
    rows.append((name, best_time(run, args.repeats)))

  field_of_view = preprocess.field_of_view(size)
  masks = [study_scores.score_masks(e.masks) for e in examples if e.masks is not None]
  ig = [localization.saliency(m, "positive") for m in maps["integrated_gradients"]]
  scoring = best_time(lambda: [localization.score_maps({"map": ig[i]}, masks[i], field_of_view)
                               for i in range(len(masks))], args.repeats) if masks else float("nan")
  fractions = faithfulness.default_fractions(config.study.faithfulness_points)
  ranked = np.stack(ig)

  def curves():
    for mode in faithfulness.MODES:
      jax.block_until_ready(faithfulness.curves(
          quantity, x, baseline, ranked, mode=mode, fractions=fractions,
          chunk_size=config.study.faithfulness_chunk).values)
  faithful = best_time(curves, args.repeats)

  print("\n| per image | seconds |\n|---|---|")
  for name, seconds in rows:
    print(f"| {name} | {seconds / n:.3f} |")
  print(f"| localisation scores of one map (all masks) | {scoring / max(len(masks), 1):.4f} |")
  print(f"| deletion + insertion curves of one map ({len(fractions)} fractions) | "
        f"{faithful / n:.3f} |")

  if args.full_run:
    shutil.rmtree(args.full_run, ignore_errors=True)
    start = time.perf_counter()
    result = job.run_analysis(config, args.full_run)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nwhole job ({args.config_arg}, {result.num_images} images): {minutes:.1f} min "
          f"(report: {result.report['markdown']})")


if __name__ == "__main__":
  main(sys.argv[1:])
