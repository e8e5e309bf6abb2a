#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and no network:
#
#   bash bench/gpu_check.sh
#
# 1. records the machine (nvidia-smi);
# 2. finds a Python whose torch sees CUDA: $GPU_CHECK_PYTHON, .venv/bin/python, python3,
#    /opt/torch/.venv/bin/python3, python, in that order, and says what each one has (a CPU
#    build of torch, such as the .venv made by scripts/setup.sh, cannot use CUDA);
# 3. makes the project's other packages importable WITHOUT downloading anything: if that Python
#    lacks them, it installs the wheels in .whl/ (made beforehand, where pip works, by
#    `bash bench/gpu_wheels.sh`) into a scratch folder with pip --no-index; a redis-server comes
#    from PATH, else from .whl/redis/;
# 4. runs the GPU tests (pytest -m gpu tests/workers/test_gpu.py), then the benchmark table of
#    docs/benchmarks.md on the GPU (python -m bench.run --quick --device cuda: the model alone,
#    asyncinfer and BentoML at one client, at saturation and at open-loop loads; BentoML from
#    .whl/bento/ when bench/gpu_wheels.sh put it there), each under a time limit, in about 6-8
#    minutes in all; the table's raw JSON lands in docs/bench-data/cuda/ (run
#    `python -m bench.report` afterwards, where the project's .venv is, for docs/benchmarks.md);
# 5. writes docs/gpu.json and the generated part of docs/gpu.md after every step, so a run cut
#    short still leaves what it found.
#
# Exit 0: the GPU tests passed (skips allowed) and the benchmark ran; 1: a test or the benchmark
# failed; 2: nothing to run on (no CUDA Python, or packages missing and no .whl/).
# GPU_CHECK_ALLOW_CPU=1 runs the same steps on a machine without CUDA (the GPU tests then skip):
# a dry run of this script itself.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
JSON=$ROOT/docs/gpu.json
MD=$ROOT/docs/gpu.md
WORK=${GPU_CHECK_WORK:-/tmp/asyncinfer-gpu-check}
rm -rf "$WORK" && mkdir -p "$WORK"
LOG=$WORK/gpu_check.log
TEST_LIMIT_S=${GPU_CHECK_TEST_LIMIT_S:-300}
BENCH_LIMIT_S=${GPU_CHECK_BENCH_LIMIT_S:-300}
BENCH_SCALE=${GPU_CHECK_BENCH_SCALE:-1}
export PYTHONUNBUFFERED=1

say() { printf '[gpu_check %3ss] %s\n' "$SECONDS" "$*" | tee -a "$LOG" >&2; }
st() { timeout 20 python3 bench/gpu_status.py "$@" || say "(could not record: $*)"; }
report() { st report "$JSON" "$MD"; }
finish() {  # finish STATE REASON CODE
  st set "$JSON" state "\"$1\""
  st set "$JSON" reason "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$2")"
  report
  say "done: $1 ($2); results in docs/gpu.md and docs/gpu.json, log in $LOG"
  exit "$3"
}

command -v python3 >/dev/null || { echo "gpu_check: no python3 on PATH" >&2; exit 2; }
st init "$JSON"
say "1/5 machine"
gpus=$(timeout 20 nvidia-smi -L 2>&1 | tr '\n' ';' | sed 's/;$//')
driver=$(timeout 20 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
  | head -1)
say "nvidia-smi -L: ${gpus:-none}"
st set "$JSON" machine "$(python3 -c 'import json,os,sys; print(json.dumps({"gpus": sys.argv[1] or "none", "driver": sys.argv[2] or "?", "cores": os.cpu_count()}))' "$gpus" "$driver")"
report

say "2/5 a Python whose torch sees CUDA"
PROBE='import json, sys
try:
    import torch
except Exception as exc:
    print(json.dumps({"found": f"no torch ({type(exc).__name__})", "cuda": False})); sys.exit()
ok = torch.cuda.is_available()
print(json.dumps({"found": f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
                  f"CUDA available: {ok}, devices: {torch.cuda.device_count() if ok else 0}, "
                  f"python {sys.version.split()[0]}", "cuda": ok}))'
PY=""
cands="[]"
tried=""
for c in "${GPU_CHECK_PYTHON:-}" "$ROOT/.venv/bin/python" python3 /opt/torch/.venv/bin/python3 \
         python; do
  [ -n "$c" ] || continue
  path=$(command -v "$c" 2>/dev/null) || continue
  case " $tried " in *" $path "*) continue ;; esac  # python3 is often the same file twice
  tried="$tried $path"
  out=$(PYTORCH_NVML_BASED_CUDA_CHECK=1 timeout 90 "$path" -c "$PROBE" 2>/dev/null | tail -1)
  [ -n "$out" ] || out='{"found": "did not answer in 90 s", "cuda": false}'
  say "$path: $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["found"])' "$out")"
  cands=$(python3 -c 'import json,sys; c=json.loads(sys.argv[1]); c.append({"path": sys.argv[2], **json.loads(sys.argv[3])}); print(json.dumps(c))' "$cands" "$path" "$out")
  if [ -z "$PY" ] && python3 -c 'import json,sys; sys.exit(0 if json.loads(sys.argv[1])["cuda"] else 1)' "$out"; then
    PY=$path
  fi
done
if [ -z "$PY" ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  PY=$(command -v "${GPU_CHECK_PYTHON:-python3}")
  say "no CUDA Python; GPU_CHECK_ALLOW_CPU=1: dry run with $PY"
fi
st set "$JSON" python "$(python3 -c 'import json,sys; print(json.dumps({"candidates": json.loads(sys.argv[1]), "chosen": sys.argv[2]}))' "$cands" "$PY")"
[ -n "$PY" ] || finish "not run" "no Python here has a torch that sees CUDA (a CPU build of torch cannot use the GPU)" 2
say "using $PY"

say "3/5 the project's packages (no downloads)"
IMPORTS='import celery, kombu, redis, hiredis, fastapi, uvicorn, pydantic, pydantic_settings, httpx, prometheus_client, yaml, pytest, pytest_asyncio, pytest_timeout'
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if timeout 90 "$PY" -c "$IMPORTS" 2>/dev/null; then
  packages="already installed"
elif ls .whl/*.whl >/dev/null 2>&1; then
  say "installing .whl/*.whl into $WORK/site (pip --no-index: nothing is downloaded)"
  if ! timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
       --target "$WORK/site" .whl/*.whl >>"$LOG" 2>&1; then
    finish "not run" "pip could not install .whl/ (made for another Python version? see $LOG)" 2
  fi
  export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH#$ROOT}"
  packages="from .whl/ ($(ls .whl/*.whl | wc -l) wheels)"
  missing=$(timeout 90 "$PY" -c "$IMPORTS" 2>&1 | tail -1)
  [ -z "$missing" ] || finish "not run" "packages still missing after .whl/: $missing" 2
else
  missing=$(timeout 90 "$PY" -c "$IMPORTS" 2>&1 | tail -1)
  finish "not run" "$PY lacks the project's packages ($missing) and there is no .whl/: run bash bench/gpu_wheels.sh where pip works and carry .whl/" 2
fi
if ! command -v redis-server >/dev/null; then
  if [ -x .whl/redis/redis-server ]; then
    export PATH="$ROOT/.whl/redis:$PATH"
  fi
fi
redis_version=$(timeout 10 redis-server --version 2>&1 | head -1)
say "packages: $packages; redis: ${redis_version:-none}"
st set "$JSON" packages "\"$packages; ${redis_version:-no redis-server}\""
[ -n "$redis_version" ] && [[ "$redis_version" == Redis* ]] \
  || finish "not run" "no working redis-server (PATH or .whl/redis): $redis_version" 2
report

say "4/5 GPU tests (limit ${TEST_LIMIT_S}s)"
export GPU_CHECK_RESULTS=$WORK/figures.jsonl
t0=$SECONDS
timeout -k 10 "$TEST_LIMIT_S" "$PY" -m pytest -m gpu tests/workers/test_gpu.py -p no:cacheprovider \
  -q -rs -s --timeout 240 --junitxml "$WORK/junit.xml" >"$WORK/tests.log" 2>&1
tests_rc=$?
grep -E '^gpu\[|passed|failed|skipped|SKIPPED|FAILED|Error' "$WORK/tests.log" | tail -30 \
  | while IFS= read -r line; do say "  $line"; done
st tests "$JSON" "$WORK/junit.xml" "$GPU_CHECK_RESULTS"
st step "$JSON" tests "exit $tests_rc in $((SECONDS - t0)) s"
report

say "5/5 the benchmark table on the GPU (limit ${BENCH_LIMIT_S}s)"
device=cuda
[ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] && ! "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null && device=cpu
# BentoML beside asyncinfer, as on CPU: from .whl/bento/ (no index here) with this torch.
[ -z "${BENCH_BENTO_WHEELS:-}" ] && [ -d .whl/bento ] && export BENCH_BENTO_WHEELS=$ROOT/.whl/bento
# A dry run on CPU publishes nothing (--only mlp): docs/bench-data/cpu stays the CPU run's.
scope=()
[ "$device" = cpu ] && scope=(--only mlp)
t0=$SECONDS
touch "$WORK/bench.start"
timeout -k 10 "$BENCH_LIMIT_S" "$PY" -m bench.run --quick --device "$device" "${scope[@]}" \
  --no-docs --scale "$BENCH_SCALE" >"$WORK/bench.log" 2>&1
bench_rc=$?
grep -E '^bench: ' "$WORK/bench.log" | tail -40 | while IFS= read -r line; do say "  $line"; done
# This run's folder only: an earlier run's table must not pass for this one's.
summary=$(find bench/results -maxdepth 1 -name "*-quick-$device" -newer "$WORK/bench.start" \
  2>/dev/null | sort | tail -1)/summary.json
st table "$JSON" "$summary"
st step "$JSON" benchmark "exit $bench_rc in $((SECONDS - t0)) s"

if [ "$device" = cpu ]; then
  finish "dry run on CPU" "no CUDA here: GPU tests skipped, benchmark on a CPU slot; tests exit $tests_rc, benchmark exit $bench_rc" "$tests_rc"
fi
if [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]; then
  finish "passed" "GPU tests passed (see skips), benchmark ran; ${SECONDS}s" 0
fi
finish "failed" "GPU tests exit $tests_rc, benchmark exit $bench_rc (124: out of time); see $LOG" 1
