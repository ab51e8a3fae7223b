#!/usr/bin/env bash
# Set up, lint, and run the test suite on the newest transformers release that pyproject.toml allows (.venv) and
# on the oldest (.venv-oldest). Extra arguments go to pytest (both runs).
#   MOE_TEST_OLDEST=0   skip the run on the oldest release (e.g. while iterating locally)
#   VENV / OLDEST_VENV  the two environment folders
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
OLDEST_VENV="${OLDEST_VENV:-.venv-oldest}"
bash scripts/setup.sh
PY="$VENV/bin/python"
"$PY" -m ruff check .
"$PY" -m ruff format --check .

if [ "${MOE_TEST_OLDEST:-1}" = "0" ]; then
  "$PY" -m pytest -q "$@"
  exit 0
fi
OLDEST="$("$PY" scripts/transformers_range.py oldest)"
VENV="$OLDEST_VENV" TRANSFORMERS_VERSION="$OLDEST" bash scripts/setup.sh
OLD_PY="$OLDEST_VENV/bin/python"
NEWEST="$("$PY" -c 'import transformers; print(transformers.__version__)')"

# Each run also loads a folder saved under its release with the other release (tests/test_transformers_compat.py).
echo "test: transformers $NEWEST (the newest release pyproject.toml allows)"
# (absolute paths to the venvs' own interpreters: resolving their symlinks would leave the venv)
MOE_COMPAT_PYTHONS="$(cd "$OLDEST_VENV/bin" && pwd)/python" "$PY" -m pytest -q "$@"
echo "test: transformers $OLDEST (the oldest release pyproject.toml allows)"
MOE_COMPAT_PYTHONS="$(cd "$VENV/bin" && pwd)/python" "$OLD_PY" -m pytest -q "$@"
echo "test: passed on transformers $NEWEST and $OLDEST"
