#!/usr/bin/env bash
# Set up and run the end-to-end demo (the main job). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${VENV:-.venv}/bin/python" -m training.demo "$@"
