#!/usr/bin/env bash
# The whole test suite, from a fresh clone: creates .venv, installs the project (torch pinned to
# the CPU build), makes sure a redis-server exists, then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec python -m pytest "$@"
