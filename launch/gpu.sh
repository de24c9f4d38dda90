#!/usr/bin/env bash
# One node with all its GPUs: one process drives every local GPU (data-parallel
# over a 1-D mesh of all of them).
#   bash launch/gpu.sh train --config=configs/kaggle.py --workdir=/scratch/drig/kaggle
#   bash launch/gpu.sh analyze --config=configs/analyze.py --workdir=/scratch/drig/analysis \
#       --config.checkpoint=/scratch/drig/kaggle
# Installs drig's requirements plus the CUDA build of the jax version that
# requirements.txt pins (JAX_CUDA=cuda13 for CUDA 13 drivers; default cuda12).
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY="${1:?usage: launch/gpu.sh train|analyze FLAGS...}"; shift
case "$BINARY" in train|analyze) ;; *) echo "unknown binary $BINARY: train or analyze" >&2; exit 2;; esac
source launch/env.sh requirements.txt
JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"
python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null \
  || python -m pip install -q "jax[${JAX_CUDA:-cuda12}]==${JAX_VERSION}"
# Let XLA take most of the GPU memory; TensorFlow (TFDS) is kept off the GPU by drig.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m "drig.${BINARY}" --distributed=no "$@"
