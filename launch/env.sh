#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv for drig. Sourced by the
# other launch scripts. $1: the requirements file to install (default:
# requirements.txt). Set DRIG_VENV to use another location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DRIG_VENV:-$ROOT/.venv}"
REQS="${1:-requirements.txt}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the requirements changed since the last install.
stamp="$VENV/.drig-$(basename "$REQS").sha"
want="$(cat "$ROOT/requirements.txt" "$ROOT/$REQS" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/$REQS"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
