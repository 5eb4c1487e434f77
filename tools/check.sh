#!/usr/bin/env bash
# Install and run every check: lint (ruff), format, types (pyright), tests (pytest).
# Usage: bash tools/check.sh        (the README's test command; .ci/run runs exactly this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[tests]"
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== pyright"
.venv/bin/pyright --pythonpath .venv/bin/python lora_muon_jax
echo "== pytest"
.venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
