#!/usr/bin/env bash
# The main job: set up, then measure the bundled default test list and print a
# summary. Results land in the local DuckDB file (see `vantage results list`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
vantage run web --list default "$@"
