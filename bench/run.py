"""Regenerate every benchmark table of docs/benchmarks.md in one command.

    python -m bench.run --quick                 # about 5 minutes on 2 cores
    python -m bench.run --full                  # about 15-20 minutes, repeats and more loads
    python -m bench.run --full --device cuda    # the MLP tables on a GPU (skips without CUDA)

Phases, all in one run on one machine, every system driven by the same generator
(asyncinfer.loadgen, a process of its own):
1. the model's own limit (bench.model_limit: torch alone, pinned like a worker);
2. the MLP (256 -> 3x2048 -> 16, max_batch_size=64, max_latency_ms=250): asyncinfer
   (`asyncinfer up`, one worker per core), BentoML with workers=2 (what its docs recommend for
   CPU) and workers=1, all up at once and driven in turn: one client (closed loop), saturation
   (closed loop, several client counts), then open-loop Poisson loads at fractions of
   asyncinfer's saturation, the same offered rates for every system;
3. the synthetic model (a batch of n costs 2 ms * n + 10 ms): light load (25 jobs/s), the
   fitted latency model after it, one client; then a copy with `on_overload = "shed"` at
   0.5x to 2x its capacity;
4. (--full) HTTP: the bare trivial server against the gateway alone (submit path).
The raw JSON of every run goes to bench/results/<stamp>/ and, for the published tables, to
docs/bench-data/<device>/; docs/benchmarks.md and docs/img/bench-*.png come from bench.report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.analysis import BENTO1, BENTO2, OURS
from bench.docs import DOCS, REPO, RESULTS
from bench.drive import Runner, log, settle, write_bodies, write_synthetic_bodies
from bench.machine import cuda_available, machine_info
from bench.systems import (
    MAX_LATENCY_MS,
    BentoServer,
    GatewayOnly,
    OursStack,
    Server,
    TrivialServer,
    ensure_bento_venv,
    model_table,
)

DATA = DOCS / "bench-data"  # the published runs' raw JSON, one folder per device
SYNTH_CLASS = "workers.builtin.synthetic:SyntheticModel"
SYNTH, SHED = "synthetic", "synthetic-shed"
SYNTH_A_S, SYNTH_B_S, SYNTH_BATCH, SYNTH_LATENCY_MS = 0.002, 0.010, 32, 200


@dataclass
class Profile:
    duration_s: float  # arrivals per run
    warmup_s: float  # left out of the figures
    repeats: int  # of the one-client and offered-load runs, interleaved across systems
    sat_concurrency: list[int]  # closed-loop client counts tried for saturation
    sat_repeats: int
    fractions: list[float]  # offered loads, as fractions of asyncinfer's saturation
    w1_loads: bool  # BentoML workers=1 at the offered loads too (always at 1 client, saturation)
    light_rate: float  # synthetic light load, jobs/s
    light_s: float
    light_protocols: list[str]
    shed_factors: list[float]  # offered load as multiples of the shed model's capacity
    shed_repeats: int
    limit_seconds: float
    http: bool  # the HTTP phase (bare server against the gateway's submit path)
    http_concurrency: int = 64


PROFILES = {
    "quick": Profile(duration_s=5, warmup_s=1, repeats=1, sat_concurrency=[64, 128, 256],
                     sat_repeats=1, fractions=[0.25, 0.5, 0.75], w1_loads=False,
                     light_rate=25, light_s=10, light_protocols=["jobs"],
                     shed_factors=[0.5, 1.0, 1.5, 2.0], shed_repeats=1, limit_seconds=0.3,
                     http=False),
    "full": Profile(duration_s=8, warmup_s=2, repeats=2, sat_concurrency=[32, 64, 128, 256, 512],
                    sat_repeats=1, fractions=[0.1, 0.25, 0.5, 0.75, 0.9], w1_loads=True,
                    light_rate=25, light_s=12, light_protocols=["jobs", "jobs-wait"],
                    shed_factors=[0.5, 1.0, 1.5, 2.0], shed_repeats=2, limit_seconds=0.6,
                    http=True),
}


@dataclass
class Ctx:
    out: Path
    profile: Profile
    device: str
    replicas: int
    runner: Runner
    bento_body: bytes = b""
    notes: list[str] = field(default_factory=list)


def _proto(system: str) -> str:
    return "sync" if system.startswith("bentoml") else "jobs"


# -- phases -----------------------------------------------------------------------------------


def phase_limit(ctx: Ctx) -> dict[str, Any]:
    """The model alone on one core (or the GPU): best rows/s and the batch-of-one time."""
    out = ctx.out / "model-limit.json"
    log(f"model limit on {ctx.device}")
    subprocess.run([sys.executable, "-m", "bench.model_limit", "--device", ctx.device,
                    "--workers", "1", "--seconds", str(ctx.profile.limit_seconds),
                    "--out", str(out)], check=True, cwd=REPO)
    limit: dict[str, Any] = json.loads(out.read_text())
    log(f"model limit: best {limit['best_rows_per_s']:.0f} rows/s at batch "
        f"{limit['best_batch_size']}, batch of one {limit['batch1_forward_ms']:.2f} ms")
    return limit


def phase_mlp(ctx: Ctx, venv: Path | None) -> dict[str, Any]:
    p, run = ctx.profile, ctx.runner
    devices = ("cuda:" + ",".join(str(i) for i in range(ctx.replicas)) if ctx.device == "cuda"
               else f"cpu:{ctx.replicas}")
    ours = OursStack(ctx.out / OURS, devices=devices, workers=ctx.replicas)
    bentos = ([BentoServer(ctx.out / name, name=name, venv=venv, workers=w, device=ctx.device)
               for name, w in ((BENTO2, 2), (BENTO1, 1))] if venv else [])
    systems: list[tuple[str, Server]] = [(OURS, ours), *((b.name, b) for b in bentos)]
    res: dict[str, Any] = {
        "devices": devices, "workers": {OURS: ctx.replicas, BENTO2: 2, BENTO1: 1},
        "systems": [name for name, _ in systems], "one_client": {}, "saturation": {},
        "loads": []}

    def settled(srv: Server) -> None:
        settle(srv, ctx.bento_body)

    try:
        for b in bentos:  # they start while asyncinfer starts
            b.launch()
        log(f"starting asyncinfer (ASYNCINFER_DEVICES={devices}, {ctx.replicas} worker(s)) and "
            f"{len(bentos)} BentoML server(s)")
        ours.start()
        for b in bentos:
            b.wait_ready()
        def warm_up(clients: int) -> None:  # the fit, the pools, the caches; not recorded
            for name, srv in systems:
                run.run(srv, system=name, kind=f"warmup-c{clients}", protocol=_proto(name),
                        concurrency=clients, duration_s=3, warmup_s=1, record=False)
                settled(srv)

        # One client first, after a light warm-up: BentoML's dispatcher learns its wait from
        # recent traffic, and a heavy warm-up would leave it waiting for company that never
        # comes for a while.
        warm_up(1)
        one = [(OURS, ours, "jobs"), (OURS, ours, "jobs-wait"),
               *((b.name, b, "sync") for b in bentos)]
        for _ in range(p.repeats):
            for name, srv, proto in one:
                key = f"{name}/{proto}" if name == OURS else name
                pt = run.run(srv, system=name, kind=f"one-client-{proto}", protocol=proto,
                             concurrency=1, slo_ms=MAX_LATENCY_MS)
                res["one_client"].setdefault(key, []).append(pt)
                settled(srv)
        warm_up(64)
        for _ in range(p.sat_repeats):
            for name, srv in systems:
                pts = []
                for c in p.sat_concurrency:
                    pts.append(run.run(srv, system=name, kind=f"saturation-c{c}",
                                       protocol=_proto(name), concurrency=c,
                                       slo_ms=MAX_LATENCY_MS))
                    settled(srv)
                res["saturation"].setdefault(name, []).append(pts)
                if name == OURS:  # the one-request form of the contract at the best count
                    best = max(pts, key=lambda x: x.get("goodput_per_s") or 0)
                    pt = run.run(srv, system=name, kind="saturation-prefer-wait",
                                 protocol="jobs-wait", concurrency=best["concurrency"],
                                 slo_ms=MAX_LATENCY_MS)
                    res["saturation"].setdefault(f"{OURS}/jobs-wait", []).append([pt])
                    settled(srv)
        sat = statistics.median(max(x["throughput_per_s"] for x in pts)
                                for pts in res["saturation"][OURS])
        res["ours_saturation"] = sat
        loaded = [(n, s) for n, s in systems if n != BENTO1 or p.w1_loads]
        # The loads only climb: BentoML, once driven past its peak, goes on refusing for a while
        # even at light load, so a lower load measured after a higher one would show that.
        for frac in p.fractions:
            point: dict[str, Any] = {"fraction": frac, "rate": frac * sat}
            for _ in range(p.repeats):
                for name, srv in loaded:
                    pt = run.run(srv, system=name, kind=f"load-{round(frac * 100)}",
                                 protocol=_proto(name), rate=frac * sat, slo_ms=MAX_LATENCY_MS)
                    point.setdefault(name, []).append(pt)
                    settled(srv)
            res["loads"].append(point)
        res["stack_logs"] = str((ours.work_dir / "state" / "logs").relative_to(REPO))
    finally:
        for b in bentos:
            b.stop()
        ours.stop()
    return res


def synthetic_models() -> str:
    """The synthetic model twice, one worker each: queue mode and shed mode."""
    opts = {"params": {"a_s": SYNTH_A_S, "b_s": SYNTH_B_S}, "max_batch_size": SYNTH_BATCH,
            "max_latency_ms": SYNTH_LATENCY_MS}
    return (model_table(SYNTH, SYNTH_CLASS, 1, **opts) + "\n"
            + model_table(SHED, SYNTH_CLASS, 1, on_overload="shed", **opts))


def phase_synthetic(ctx: Ctx) -> dict[str, Any]:
    """Light load and the fit, one client, then shed mode from 0.5x to 2x capacity. The
    synthetic model sleeps instead of computing, so it runs on CPU slots on any machine."""
    p, run = ctx.profile, ctx.runner
    capacity = SYNTH_BATCH / (SYNTH_A_S * SYNTH_BATCH + SYNTH_B_S)
    res: dict[str, Any] = {
        "truth": {"a_s": SYNTH_A_S, "b_s": SYNTH_B_S}, "max_latency_ms": SYNTH_LATENCY_MS,
        "max_batch_size": SYNTH_BATCH, "batch1_ms": 1000 * (SYNTH_A_S + SYNTH_B_S),
        "light": {}, "one_client": {},
        "shed": {"capacity_per_s": capacity, "loads": []}}
    stack = OursStack(ctx.out / "asyncinfer-synthetic", devices="cpu:2",
                      models=synthetic_models())
    try:
        log("starting asyncinfer with the synthetic model (queue and shed)")
        stack.start()
        # Light load first, on the fresh stack: the fit then has seen nothing but its start-up
        # probes and this traffic.
        for proto in p.light_protocols:
            res["light"][proto] = run.run(
                stack, system=OURS, kind=f"synthetic-light-{proto}", protocol=proto,
                model=SYNTH, rate=p.light_rate, duration_s=p.light_s, slo_ms=SYNTH_LATENCY_MS)
            settle(stack, model=SYNTH)
            if "fit" not in res:
                info = stack.model_info(SYNTH)
                res["fit"] = {"a_s": info.get("a"), "b_s": info.get("b"),
                              "overhead_s": info["batcher"].get("overhead_s"),
                              "batch_rows": info["batcher"].get("batch_rows"),
                              "handoff_ms_p50": info["batcher"].get("handoff_ms_p50")}
                log(f"synthetic fit after light load: {res['fit']}")
        for _ in range(p.repeats):
            for proto in ("jobs", "jobs-wait"):
                pt = run.run(stack, system=OURS, kind=f"synthetic-one-client-{proto}",
                             protocol=proto, model=SYNTH, concurrency=1)
                res["one_client"].setdefault(proto, []).append(pt)
                settle(stack, model=SYNTH)
        for factor in p.shed_factors:
            load: dict[str, Any] = {"factor": factor, "rate": factor * capacity, "runs": []}
            for _ in range(p.shed_repeats):
                load["runs"].append(run.run(
                    stack, system=OURS, kind=f"shed-{factor:g}x", protocol="jobs", model=SHED,
                    rate=factor * capacity, slo_ms=SYNTH_LATENCY_MS))
                settle(stack, model=SHED)
            res["shed"]["loads"].append(load)
        info = stack.model_info(SHED)
        res["shed"]["fit"] = {"a_s": info.get("a"), "b_s": info.get("b")}
        res["shed"]["batcher"] = {k: info["batcher"].get(k) for k in (
            "dispatch_reasons", "batch_rows", "queue_wait", "policy")}
    finally:
        stack.stop()
    return res


def phase_http(ctx: Ctx) -> dict[str, Any]:
    """The bare trivial server against the gateway alone (Redis + gateway, nothing consuming),
    driven in turn with the same body and concurrency: the submit path's share of the bare HTTP
    ceiling, and the generator's own ceiling (the whole job pattern on the trivial server)."""
    p, run = ctx.profile, ctx.runner
    c = p.http_concurrency
    out: dict[str, Any] = {"trivial_submit": [], "gateway_submit": [], "concurrency": c}
    with TrivialServer(ctx.out / "trivial") as triv, GatewayOnly(ctx.out / "gateway") as gw:
        pairs: list[tuple[str, Server]] = [("trivial", triv), ("gateway", gw)]
        for name, srv in pairs:
            run.run(srv, system=name, kind="warmup", protocol="submit", concurrency=c,
                    duration_s=2, warmup_s=0.5, record=False)
            settle(srv)
        for _ in range(p.repeats):
            for name, srv in pairs:
                out[f"{name}_submit"].append(run.run(srv, system=name, kind="submit",
                                                     protocol="submit", concurrency=c))
                settle(srv)
        out["trivial_jobs"] = run.run(triv, system="trivial", kind="jobs", protocol="jobs",
                                      concurrency=c)
    return out


# -- the run ----------------------------------------------------------------------------------


def publish(out: Path, result: dict[str, Any], device: str) -> Path:
    """Copy the summary and every recorded run's raw JSON to docs/bench-data/<device>/. What
    other benchmarks keep there (eta.json, lone-batch.json) stays."""
    dest = DATA / device
    shutil.rmtree(dest / "runs", ignore_errors=True)
    (dest / "runs").mkdir(parents=True)
    for f in sorted((out / "runs").glob("*.json")):
        if not f.stem.endswith("-warmup"):
            shutil.copy2(f, dest / "runs" / f.name)
    for name in ("model-limit.json",):
        if (out / name).exists():
            shutil.copy2(out / name, dest / name)
    (dest / "summary.json").write_text(json.dumps(result, indent=1))
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="short runs, one repeat (default)")
    g.add_argument("--full", action="store_true", help="longer runs, repeats, more loads")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--replicas", type=int, default=None,
                    help="asyncinfer's mlp workers (default: 2 on cpu, i.e. one per core of "
                         "this 2-core machine like BentoML's workers=2; 1 on cuda)")
    ap.add_argument("--only", choices=("mlp", "synthetic"), default=None,
                    help="run one part (the limit phase always runs); publishes nothing")
    ap.add_argument("--no-bentoml", action="store_true", help="skip the peer")
    ap.add_argument("--no-docs", action="store_true", help="write JSON only")
    ap.add_argument("--no-publish", action="store_true",
                    help="leave docs/bench-data alone (the raw JSON stays in bench/results)")
    ap.add_argument("--note", default="", help="a line shown at the top of the report "
                    "(e.g. 'provisional: measured while other work ran')")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every run's duration (a smoke test: --scale 0.3)")
    a = ap.parse_args(argv)
    mode = "full" if a.full else "quick"
    if a.device == "cuda" and not cuda_available():
        log("--device cuda: no CUDA device here (nvidia-smi / torch.cuda); skipping.")
        return 0
    replicas = a.replicas or (1 if a.device == "cuda" else 2)
    profile = PROFILES[mode]
    if a.scale != 1.0:
        profile = replace(profile, duration_s=profile.duration_s * a.scale,
                          warmup_s=profile.warmup_s * a.scale, light_s=profile.light_s * a.scale)
    publishing = not (a.no_publish or a.only)  # the published set is always a whole run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"{stamp}-{mode}-{a.device}"
    job, bento = write_bodies(out)
    runner = Runner(out, profile.duration_s, profile.warmup_s,
                    {"job": job, "bentoml": bento, "synthetic": write_synthetic_bodies(out)})
    ctx = Ctx(out=out, profile=profile, device=a.device, replicas=replicas, runner=runner,
              bento_body=bento.read_bytes().splitlines()[0])
    started = time.monotonic()
    venv = None
    if not a.no_bentoml and a.only != "synthetic":
        try:
            venv = ensure_bento_venv(RESULTS, RESULTS / "bentoml-install.log")
        except RuntimeError as exc:  # a machine that reaches no package index
            log(f"BentoML left out: {exc}")
            ctx.notes.append(f"BentoML could not be installed here ({exc}); its columns are "
                             "empty.")
    result: dict[str, Any] = {"mode": mode, "device": a.device, "replicas": replicas,
                              "scale": a.scale, "profile": asdict(profile),
                              "machine": machine_info(venv),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "note": a.note, "notes": ctx.notes,
                              "raw": str(out.relative_to(REPO))}
    result["limit"] = phase_limit(ctx)
    if a.only in (None, "mlp"):
        result["mlp"] = phase_mlp(ctx, venv)
    # The synthetic model sleeps instead of computing: its tables are the same on any device,
    # so a GPU run leaves them out unless asked.
    if a.only == "synthetic" or (a.only is None and a.device == "cpu"):
        result["synthetic"] = phase_synthetic(ctx)
    if profile.http and a.only is None:
        result["http"] = phase_http(ctx)
    result["elapsed_s"] = time.monotonic() - started
    result["machine"]["loadavg_after"] = os.getloadavg()
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    log(f"results in {out} ({result['elapsed_s']:.0f} s)")
    if publishing:
        log(f"raw JSON of the published tables in {publish(out, result, a.device)}")
    if not a.no_docs:
        from bench.report import load_published, write_report

        results = load_published(DATA) if publishing else {}
        results[a.device] = result
        write_report(DOCS, results)
        log(f"wrote {DOCS / 'benchmarks.md'} and {DOCS / 'img'}/bench-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
