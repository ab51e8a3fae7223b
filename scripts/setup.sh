#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package with its dev tools.
#
# torch comes first: if the environment has no torch, the CPU build `torch==2.13.0` is installed. GPU users
# install their own CUDA build of torch into the environment before running this script (see README), and this
# script leaves it alone. VENV=path picks another environment folder; PYTHON=python3.x picks the interpreter.
#
# transformers: the newest release pyproject.toml allows (upgraded if the environment has an older one), or
# exactly TRANSFORMERS_VERSION=X.Y.Z when that is set (scripts/test.sh uses it for the oldest allowed release).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch in $VENV, installing the CPU build torch==2.13.0"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if [ -n "${TRANSFORMERS_VERSION:-}" ]; then
  "$PY" -m pip install --quiet -e ".[dev]" "transformers==${TRANSFORMERS_VERSION}"
else
  # transformers does not depend on torch, so upgrading it cannot replace the torch build chosen above
  "$PY" -m pip install --quiet -e ".[dev]"
  "$PY" -m pip install --quiet --upgrade "$("$PY" scripts/transformers_range.py spec)"
fi
"$PY" -c "import torch, transformers; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, python at $VENV/bin/python')"
