#!/usr/bin/env bash
# Creates the environment with the test-only reference libraries and runs the
# test suite. Extra arguments go to pytest, e.g. `bash launch/test.sh -k preprocess`.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh requirements-test.txt
# Tests that need several (fake) devices or processes start their own Python
# processes; the suite itself runs on the one CPU device.
export TF_CPP_MIN_LOG_LEVEL=2
exec python -m pytest -q tests "$@"
