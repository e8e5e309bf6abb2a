"""One generator run against one server, as the benchmark does it: asyncinfer's load generator
(`python -m asyncinfer.loadgen`) in a process of its own, with the CPU the server's processes
spent meanwhile read from /proc, and the run's raw result kept as a JSON file."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.analysis import worker_predict
from bench.docs import REPO
from bench.systems import BentoServer, GatewayOnly, OursStack, Server, cpu_delta, tree_cpu

FEATURES = 256
DRAIN_S = 20.0  # how long a run waits for its stragglers after the last arrival


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def write_bodies(out: Path, n: int = 64) -> tuple[Path, Path]:
    """The same random feature vectors in each system's request shape (asyncinfer, BentoML)."""
    rng = random.Random(0)
    vectors = [[round(rng.uniform(-1, 1), 6) for _ in range(FEATURES)] for _ in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    job = out / "bodies-job.jsonl"
    bento = out / "bodies-bentoml.jsonl"
    job.write_text("".join(json.dumps({"input": {"features": v}}) + "\n" for v in vectors))
    bento.write_text("".join(json.dumps({"features": [v]}) + "\n" for v in vectors))
    return job, bento


def write_synthetic_bodies(out: Path, n: int = 64) -> Path:
    path = out / "bodies-synthetic.jsonl"
    path.write_text("".join(json.dumps({"input": {"x": float(i)}}) + "\n" for i in range(n)))
    return path


# The figures of one run that the report uses (the raw file keeps everything).
POINT_KEYS = ("system", "kind", "model", "protocol", "offered_per_s", "throughput_per_s",
              "goodput_per_s", "slo_ms", "within_slo_fraction", "latency_ms",
              "latency_ms_with_unfinished", "status_counts", "ok_fraction", "batch_size",
              "server_cpu_s", "server_cpu_total_s", "server_cpu_ms_per_job",
              "client_cpu_fraction", "breakdown_ms", "error_samples", "window_s", "wall_s",
              "client_retries", "server_cpu_us_per_request", "requests", "issue_lag_ms",
              "client_cpu_s", "succeeded_total", "jobs_total", "worker_predict_ms", "file")


def point(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in POINT_KEYS}
    closed = r["config"]["mode"] == "closed"
    out["concurrency"] = r["config"]["concurrency"] if closed else None
    out["rate"] = None if closed else r["config"]["rate"]
    return out


@dataclass
class Runner:
    """Runs the generator; every recorded run's raw JSON lands in `out/runs/`."""

    out: Path
    duration_s: float
    warmup_s: float
    bodies: dict[str, Path] = field(default_factory=dict)  # "job", "bentoml", "synthetic"
    count: int = 0

    def run(self, server: Server, *, system: str, kind: str, protocol: str,
            rate: float | None = None, concurrency: int | None = None, model: str = "mlp",
            slo_ms: float | None = None, duration_s: float | None = None,
            warmup_s: float | None = None, arrivals: str = "poisson",
            record: bool = True) -> dict[str, Any]:
        """One run (open loop at `rate`, or closed loop with `concurrency` clients); returns
        the generator's summary with the server's CPU, as a point (see POINT_KEYS)."""
        duration = self.duration_s if duration_s is None else duration_s
        warmup = self.warmup_s if warmup_s is None else warmup_s
        bento = isinstance(server, BentoServer)
        where = ["--path", "/predict"] if bento else ["--model", model]
        bodies = self.bodies["bentoml" if bento else
                             "synthetic" if model.startswith("synthetic") else "job"]
        load = ["--rate", f"{rate:.3f}"] if rate is not None else [
            "--concurrency", str(concurrency)]
        label = f"{system} {kind} " + (f"{rate:.0f}/s" if rate is not None else
                                       f"C={concurrency}")
        self.count += 1
        name = f"{self.count:03d}-{system}-{kind}" + ("" if record else "-warmup")
        out = self.out / "runs" / f"{name}.json"
        cmd = [sys.executable, "-m", "asyncinfer.loadgen", "--url", server.url, *where,
               "--bodies", str(bodies), "--protocol", protocol, *load, "--arrivals", arrivals,
               "--duration", str(duration), "--warmup", str(warmup), "--timeout", str(DRAIN_S),
               "--label", label, "--out", str(out)]
        if slo_ms is not None:
            cmd += ["--slo-ms", str(slo_ms)]
        batch0 = server.batch_stats() if isinstance(server, BentoServer) else None
        cpu0 = tree_cpu(server.roots())
        started = time.monotonic()
        # The workers' reports of about the generator's measured window (its warm-up left
        # out; the generator's process starts a little after this).
        since_ms = int((time.time() + warmup) * 1000)
        subprocess.run(cmd, check=True, cwd=REPO)
        wall = time.monotonic() - started
        cpu = cpu_delta(cpu0, tree_cpu(server.roots()))
        r: dict[str, Any] = json.loads(out.read_text())
        r.update(system=system, kind=kind, model=model, protocol=protocol, wall_s=wall,
                 server_cpu_s=cpu, server_cpu_total_s=sum(cpu.values()), file=out.name)
        if isinstance(server, OursStack):
            r["worker_predict_ms"] = _worker_predict(server, model, since_ms,
                                                     since_ms + int(1000 * (duration - warmup)))
        if batch0 is not None and isinstance(server, BentoServer):
            total, count = server.batch_stats()
            d_count = count - batch0[1]
            r["batch_size"]["mean"] = (total - batch0[0]) / d_count if d_count else None
            r["batch_size"]["source"] = "bentoml_service_adaptive_batch_size"
        # All the jobs the run completed (warm-up and drain included), like the CPU it measured.
        ok = r["succeeded_total"]
        r["server_cpu_ms_per_job"] = (1000 * r["server_cpu_total_s"] / ok) if ok else None
        r["server_cpu_us_per_request"] = {k: 1e6 * v / max(1, r["requests"])
                                          for k, v in cpu.items()}
        lat = r["latency_ms"]
        good = (f", goodput {r['goodput_per_s']:.0f}/s" if "goodput_per_s" in r else "")
        log(f"{label}: {r['throughput_per_s']:.0f}/s ok{good}, p50 {_ms(lat['p50'])} "
            f"p99 {_ms(lat['p99'])}, batch {_num(r['batch_size']['mean'])}, "
            f"statuses {r['status_counts']}")
        out.write_text(json.dumps(r, indent=1))
        return point(r)


def _worker_predict(server: OursStack, model: str, since_ms: int,
                    until_ms: int) -> dict[str, Any] | None:
    """The workers' own predict times for a run; None (and a line) when they cannot be read:
    a figure beside the run's, never a reason to lose the run."""
    import redis

    try:
        return worker_predict(server.worker_reports(model, since_ms, until_ms))
    except (redis.RedisError, OSError, RuntimeError) as exc:
        log(f"warning: the workers' reports of this run could not be read: {exc}")
        return None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def settle(server: Server, bento_body: bytes | None = None, model: str = "mlp") -> None:
    """Let a run's leftovers finish, and the system recover, before the next run starts."""
    if isinstance(server, OursStack):
        if not server.wait_idle(90, model):
            log("warning: asyncinfer still had queued jobs after 90 s")
    elif isinstance(server, GatewayOnly):
        server.flush()
    elif isinstance(server, BentoServer) and bento_body is not None:
        took = server.wait_recovered(bento_body)
        if took > 5:
            log(f"bentoml answered again after {took:.0f} s")
    time.sleep(1.0)
