#!/usr/bin/env bash
# The whole stack on this machine, from a fresh clone: installs into .venv on first use, then
# runs `asyncinfer up` (Redis, gateway, batcher, autoscaler + workers, Flower). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec asyncinfer up "$@"
