#!/usr/bin/env bash
# Prepare, here (where pip reaches PyPI), what bench/gpu_check.sh needs on a GPU machine that
# has Python and a CUDA build of torch but no network: the project's other packages as wheels
# for that machine's Python, in .whl/ (ignored by git), BentoML's (the benchmark's peer) in
# .whl/bento/, plus this machine's redis-server with the libraries it needs that a CUDA image
# may lack. Carry .whl/ to the GPU machine with the tree (about 35 MB).
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12 (the lent GPU machines' python3)
#
# The versions are the ones this project's .venv runs (pip freeze), so the GPU run uses what the
# CPU suite tested. torch, numpy and CUDA come from the GPU machine itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run bash scripts/setup.sh first" >&2; exit 1; }
mkdir -p .whl
reqs=.whl/requirements.txt
# Every package the services and the GPU tests import, with what they require in turn (torch
# and numpy excepted: the GPU machine's own), at the versions installed in .venv.
"$PY" - > "$reqs" <<'PYEOF'
import importlib.metadata as md
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOTS = ["redis[hiredis]", "celery[redis]", "kombu", "pydantic", "pydantic-settings", "fastapi",
         "uvicorn[standard]", "prometheus-client", "httpx", "pytest", "pytest-asyncio",
         "pytest-timeout", "pyyaml"]
env = default_environment()
todo, seen, pins = [Requirement(r) for r in ROOTS], set(), {}
while todo:
    req = todo.pop()
    key = (req.name.lower(), frozenset(req.extras))
    if key in seen:
        continue
    seen.add(key)
    dist = md.distribution(req.name)
    pins[dist.metadata["Name"]] = dist.version
    for raw in dist.requires or []:
        dep = Requirement(raw)
        extras = list(req.extras) or [""]
        if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
            todo.append(dep)
for name in sorted(pins, key=str.lower):
    if name.lower() not in ("torch", "numpy"):
        print(f"{name}=={pins[name]}")
PYEOF
echo "downloading $(wc -l < "$reqs") wheels for CPython $PYV into .whl/"
# Binary wheels for that Python on any manylinux x86-64 (pip matches each tag exactly).
download() {
  python3 -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 "$@"
}
download --no-deps -d .whl -r "$reqs"
# The benchmark's peer, BentoML at the pin bench/systems.py names, with what it requires for that
# Python, resolved by pip; numpy and torch stay the GPU machine's own.
bento_pin=$(sed -n 's/^BENTOML_PIN = "\(.*\)"$/\1/p' bench/systems.py)
echo "downloading $bento_pin and its requirements for CPython $PYV into .whl/bento/"
rm -rf .whl/bento && mkdir -p .whl/bento
download -d .whl/bento "$bento_pin"
rm -f .whl/bento/numpy-*.whl .whl/bento/torch-*.whl
# redis-server: the binary and the libraries a CUDA image is unlikely to have.
if command -v redis-server >/dev/null; then
  mkdir -p .whl/redis
  cp -L "$(command -v redis-server)" .whl/redis/redis-server.bin
  for lib in libjemalloc.so.2 liblzf.so.1 libatomic.so.1; do
    path=$(ldd "$(command -v redis-server)" | awk -v l="$lib" '$1 == l {print $3}')
    [ -n "$path" ] && cp -L "$path" .whl/redis/
  done
  cat > .whl/redis/redis-server <<'SH'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis-server.bin" "$@"
SH
  chmod +x .whl/redis/redis-server
fi
du -sh .whl
