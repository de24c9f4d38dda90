#!/usr/bin/env bash
# A TPU VM or pod slice: copies the repository to every worker and runs the same
# command on all of them; jax.distributed.initialize() discovers the slice.
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_vm.sh train \
#       --config=configs/kaggle.py --workdir=gs://my-bucket/drig/kaggle
# The workdir and data_dir must be on storage every worker sees (e.g. GCS).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
BINARY="${1:?usage: launch/tpu_vm.sh train|analyze FLAGS...}"; shift
REMOTE_DIR="${REMOTE_DIR:-drig}"
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
  drig configs launch requirements.txt pyproject.toml README.md "$TPU:$REMOTE_DIR"
ARGS="$(printf ' %q' "$@")"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; cd $REMOTE_DIR
  source launch/env.sh requirements.txt
  JAX_VERSION=\$(python -c 'import jax; print(jax.__version__)')
  python -m pip install -q \"jax[tpu]==\$JAX_VERSION\" \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m drig.${BINARY} --distributed=yes${ARGS}"
