#!/usr/bin/env bash
# The main job on the embedded default data, on a CPU: creates the environment,
# generates the synthetic fundus data set (preprocessed), trains the small
# grader with configs/base.py:runlocal and analyses a few test images.
# Outputs go under workdirs/ (override with DRIG_WORKDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh requirements.txt
export TF_CPP_MIN_LOG_LEVEL=2
WORKDIR="${DRIG_WORKDIR:-workdirs}"
python -m drig.prepare_data --config=configs/data.py:runlocal --workdir="$WORKDIR/data"
python -m drig.train --config=configs/base.py:runlocal --workdir="$WORKDIR/runlocal"
python -m drig.analyze --config=configs/analyze.py:runlocal --workdir="$WORKDIR/analysis" \
  --config.checkpoint="$WORKDIR/runlocal"
echo
echo "Data previews:   $WORKDIR/data"
echo "Training run:    $WORKDIR/runlocal (metrics.jsonl, tensorboard/, checkpoints/)"
echo "Training curves: .venv/bin/tensorboard --logdir $WORKDIR/runlocal"
echo "Final metrics:   $WORKDIR/runlocal/final_metrics.json"
echo "Analysis report: $WORKDIR/analysis/report.html ($WORKDIR/analysis/report.md)"
echo "Analysis metrics: $WORKDIR/analysis/metrics.json"
echo "Notebook:        examples/quickstart.ipynb (DRIG_RUN=$WORKDIR/runlocal)"
echo "Figures:"
ls -1 "$WORKDIR"/analysis/figures/*.png
