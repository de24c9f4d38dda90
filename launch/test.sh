#!/usr/bin/env bash
# Creates the environment with the test-only reference libraries and runs the
# test suite. Extra arguments go to pytest, e.g. `bash launch/test.sh -k preprocess`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh requirements-test.txt
# Tests that need several (fake) devices or processes start their own Python
# processes; the suite itself runs on the one CPU device. Two pytest workers
# (whole files each, so module fixtures are built once): much of the suite is
# single-threaded XLA compilation, which overlaps well on 2 cores. DRIG_TEST_WORKERS=0
# runs everything in this process.
export TF_CPP_MIN_LOG_LEVEL=2
workers="${DRIG_TEST_WORKERS:-2}"
if [ "$workers" -gt 0 ]; then
  exec python -m pytest -q -n "$workers" --dist loadfile --durations=25 tests "$@"
fi
exec python -m pytest -q --durations=25 tests "$@"
