#!/usr/bin/env bash
# One node with all its GPUs (data-parallel over every local device).
#   bash launch/gpu.sh train --config=configs/kaggle.py --workdir=/scratch/drig/kaggle
#   bash launch/gpu.sh analyze --config=configs/analyze.py --workdir=/scratch/drig/analysis
# Installs drig's requirements plus the CUDA build of the same jax version.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh requirements.txt
JAX_VERSION="$(python -c 'import jax; print(jax.__version__)')"
python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null \
  || python -m pip install -q "jax[cuda12]==${JAX_VERSION}"
BINARY="${1:?usage: launch/gpu.sh train|analyze FLAGS...}"; shift
# Let XLA take most of the GPU memory; TensorFlow (TFDS) is kept off the GPU by drig.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m "drig.${BINARY}" --distributed=no "$@"
