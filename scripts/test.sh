#!/usr/bin/env bash
# The test suite: set up (test dependencies; as root also the lab's system
# packages), then run every test. Lab tests need root; under CI=true they may
# not skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -rs "$@"
