#!/usr/bin/env bash
# The test command of the README: bootstraps .venv if needed, then checks the style (ruff) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash test.sh tests/test_ops.py -x`.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
source scripts/ensure_browser.sh
"$PY" -m ruff format --check --quiet . && "$PY" -m ruff check --quiet .
exec "$PY" -m pytest "$@"
