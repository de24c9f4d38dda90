#!/usr/bin/env bash
# A TPU VM or pod slice (e.g. v5e-64: 16 hosts x 4 chips): copies the repository
# to every worker and runs the same command on all of them at once;
# jax.distributed.initialize() discovers the slice from the TPU metadata.
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_vm.sh train \
#       --config=configs/kaggle.py --workdir=gs://my-bucket/drig/kaggle
#   TPU=my-v5e-64 ZONE=us-west4-a bash launch/tpu_vm.sh analyze \
#       --config=configs/analyze.py --workdir=gs://my-bucket/drig/analysis \
#       --config.checkpoint=gs://my-bucket/drig/kaggle
# The workdir and data_dir must be on storage every worker sees (GCS, Filestore).
# Installs drig's requirements plus jax[tpu] at the version requirements.txt pins.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
BINARY="${1:?usage: launch/tpu_vm.sh train|analyze FLAGS...}"; shift
case "$BINARY" in train|analyze) ;; *) echo "unknown binary $BINARY: train or analyze" >&2; exit 2;; esac
REMOTE_DIR="${REMOTE_DIR:-drig}"
JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="mkdir -p $REMOTE_DIR"
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all \
  drig configs launch requirements.txt pyproject.toml README.md "$TPU:$REMOTE_DIR"
ARGS="$(printf ' %q' "$@")"
# Every worker must run the command: the slice's processes wait for each other.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -euo pipefail; cd $REMOTE_DIR
  source launch/env.sh requirements.txt
  python -c 'import jax, sys; sys.exit(jax.default_backend() != \"tpu\")' 2>/dev/null \
    || python -m pip install -q \"jax[tpu]==${JAX_VERSION}\" \
         -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m drig.${BINARY} --distributed=yes${ARGS}"
