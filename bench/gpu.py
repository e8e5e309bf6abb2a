"""The GPU benchmark run by bench/gpu_check.sh: the torch MLP on one GPU, alone and served.

1. the model's own limit on cuda:0 (bench.model_limit: rows/s by batch size, no HTTP);
2. the whole system (`asyncinfer up --no-flower`, ASYNCINFER_DEVICES=cuda, one mlp worker on
   the first GPU): saturation (closed loop, submit + long-poll) and a lone job's latency.

Each phase has its own time limit and the result so far is written after each one, so a run cut
short still leaves figures. Results go to the JSON file named by --out (merged in under
"benchmark").

    python -m bench.gpu --out docs/gpu.json [--seconds 10]
    python -m bench.gpu --out /tmp/cpu.json --device cpu   # the same harness on a CPU slot
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.drive import write_bodies
from bench.systems import OursStack

LIMIT_TIMEOUT_S = 150


def _merge(out: Path, bench: dict[str, Any]) -> None:
    data = json.loads(out.read_text()) if out.exists() else {}
    data["benchmark"] = bench
    out.write_text(json.dumps(data, indent=1))


def _log(msg: str) -> None:
    print(f"[bench.gpu] {msg}", file=sys.stderr, flush=True)


def model_limit(work: Path, device: str) -> dict[str, Any]:
    path = work / "limit.json"
    subprocess.run([sys.executable, "-m", "bench.model_limit", "--device", device,
                    "--seconds", "0.5", "--reps", "3", "--out", str(path)],
                   check=True, timeout=LIMIT_TIMEOUT_S)
    raw: dict[str, Any] = json.loads(path.read_text())
    return raw


def _loadgen(url: str, bodies: Path, work: Path, name: str, concurrency: int,
             seconds: float) -> dict[str, Any]:
    path = work / f"{name}.json"
    subprocess.run([sys.executable, "-m", "asyncinfer.loadgen", "--url", url, "--model", "mlp",
                    "--bodies", str(bodies), "--protocol", "jobs",
                    "--concurrency", str(concurrency), "--duration",
                    str(seconds), "--warmup", "2", "--quiet", "--out", str(path)],
                   check=True, timeout=seconds + 90)
    r: dict[str, Any] = json.loads(path.read_text())
    return {"concurrency": concurrency, "seconds": seconds,
            "jobs_per_s": round(r["throughput_per_s"], 1),
            "latency_ms": {k: r["latency_ms"][k] for k in ("p50", "p90", "p99")},
            "outcomes": r["status_counts"]}


def served(work: Path, seconds: float, device: str) -> dict[str, Any]:
    bodies, _ = write_bodies(work)
    devices = "cuda" if device == "cuda" else "cpu:1"
    # A GPU worker's first load (CUDA context, weights) can take minutes.
    with OursStack(work / "stack", devices=devices, workers=1, workers_timeout_s=240) as stack:
        info = stack.model_info()
        worker = info["workers"][0]
        _loadgen(stack.url, bodies, work, "warmup", 64, 4)
        out: dict[str, Any] = {
               "worker": {k: worker.get(k) for k in ("name", "device", "device_uuid")},
               "saturation": _loadgen(stack.url, bodies, work, "saturation", 256, seconds),
               "light": _loadgen(stack.url, bodies, work, "light", 1, seconds / 2)}
        state = stack.model_info()["batcher"]
        out["fit_a_ms_per_row"] = round(1000 * float(state.get("a_s") or 0), 4)
        out["fit_b_ms"] = round(1000 * float(state.get("b_s") or 0), 3)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0, help="saturation run length")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    a = ap.parse_args(argv)
    bench: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "device": a.device}
    with tempfile.TemporaryDirectory(prefix="asyncinfer-gpu-") as tmp:
        work = Path(tmp)
        phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("model_limit", lambda: model_limit(work, a.device)),
            ("served", lambda: served(work, a.seconds, a.device))]
        for name, phase in phases:
            _log(f"{name} ...")
            t0 = time.monotonic()
            try:
                bench[name] = phase()
            except Exception as exc:  # recorded; the next phase may still run
                bench[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            bench[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
            _merge(a.out, bench)
            _log(f"{name} done in {bench[name]['elapsed_s']} s")
    return 0 if all("error" not in bench[k] for k in ("model_limit", "served")) else 1


if __name__ == "__main__":
    sys.exit(main())
