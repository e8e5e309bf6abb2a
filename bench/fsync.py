"""What `appendfsync always` costs, against `everysec`.

The embedded Redis of `asyncinfer up` fsyncs its append-only file before it answers (so a 202 is
on disk when the client gets it, and a kill -9 of Redis loses none). This measures the price,
the policies interleaved, medians of the repeats:
- the submit path: a gateway process on a private Redis with each policy, the POST alone (done
  at the 202, no workers) in a closed loop;
- the whole stack: `asyncinfer up` with two MLP workers (ASYNCINFER_REDIS_APPENDFSYNC), open
  loop at each of `--rates` jobs/s (submit + long-poll), where every job's four writes (submit,
  dispatch, start, final write) each wait for their fsync.
Results go into docs/deployment.md between the fsync markers and bench/results/fsync.json.

    python -m bench.fsync [--repeats 2] [--duration 6] [--concurrency 32] [--rates 200,400]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.docs import DOCS, RESULTS, emit_json, replace_section
from bench.drive import Runner, write_bodies
from bench.systems import OursStack
from shared.procs import free_port, spawn, terminate, wait_port
from shared.redisserver import RedisServer

POLICIES = ("everysec", "always")
BEGIN, END = "<!-- fsync:begin -->", "<!-- fsync:end -->"


def _one(policy: str, work: Path, duration_s: float, concurrency: int) -> dict[str, Any]:
    server = RedisServer(work / f"redis-{policy}", appendfsync=policy).start()
    port = free_port()
    env = {"ASYNCINFER_REDIS_URL": server.url, "ASYNCINFER_GATEWAY_PORT": str(port),
           "ASYNCINFER_LOG_LEVEL": "WARNING", "ASYNCINFER_MAX_QUEUE": "10000000"}
    gateway = spawn(["-m", "gateway"], env, work / f"gateway-{policy}.log")
    try:
        if not wait_port("127.0.0.1", port, 60):
            raise RuntimeError(f"gateway did not start; see {work}")
        bodies = work / "bodies.jsonl"
        bodies.write_text(json.dumps({"input": {"x": 1.0}}) + "\n")
        out = work / f"load-{policy}-{time.monotonic_ns()}.json"
        subprocess.run([sys.executable, "-m", "asyncinfer.loadgen", "--url",
                        f"http://127.0.0.1:{port}", "--path", "/v1/models/synthetic/jobs",
                        "--bodies", str(bodies), "--protocol", "submit",
                        "--concurrency", str(concurrency), "--duration", str(duration_s),
                        "--warmup", "1", "--quiet", "--out", str(out)],
                       check=True, timeout=duration_s + 120)
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        terminate(gateway, grace_s=5)
        server.stop()


def _stack(policy: str, work: Path, rates: list[float],
           duration_s: float) -> dict[float, dict[str, Any]]:
    """`asyncinfer up` with this fsync policy: an open-loop run at each rate."""
    bodies, _ = write_bodies(work)
    runner = Runner(work / f"runs-{policy}-{time.monotonic_ns()}", duration_s, warmup_s=2,
                    bodies={"job": bodies})
    with OursStack(work / f"stack-{policy}", devices="cpu:2", workers=2,
                   env={"ASYNCINFER_REDIS_APPENDFSYNC": policy}) as stack:
        # The batcher's latency fit and lead times settle under traffic first.
        runner.run(stack, system=policy, kind="warm", protocol="jobs", rate=max(rates),
                   duration_s=4, record=False)
        return {rate: runner.run(stack, system=policy, kind=f"load-{rate:g}", protocol="jobs",
                                 rate=rate) for rate in rates}


def measure(repeats: int, duration_s: float, concurrency: int,
            rates: list[float]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    stack_runs: dict[str, list[dict[float, dict[str, Any]]]] = {p: [] for p in POLICIES}
    with tempfile.TemporaryDirectory(prefix="fsync-", dir=os.environ.get("TMPDIR")) as tmp:
        for _ in range(repeats):
            for policy in POLICIES:
                runs[policy].append(_one(policy, Path(tmp), duration_s, concurrency))
            for policy in POLICIES if rates else ():
                stack_runs[policy].append(_stack(policy, Path(tmp), rates, duration_s))
    summary = {}
    for policy, results in runs.items():
        summary[policy] = {
            "submits_per_s": statistics.median(r["throughput_per_s"] for r in results),
            "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in results),
            "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in results),
            "runs": [round(r["throughput_per_s"], 1) for r in results],
        }
    stack = {policy: {f"{rate:g}": {
        "p50_ms": statistics.median(r[rate]["latency_ms"]["p50"] for r in results),
        "p99_ms": statistics.median(r[rate]["latency_ms"]["p99"] for r in results),
        "batch": statistics.median(r[rate]["batch_size"]["mean"] for r in results),
        "legs_ms": {leg: statistics.median(r[rate]["breakdown_ms"][leg] for r in results)
                    for leg in ("queued", "running", "to_client")}}
        for rate in rates} for policy, results in stack_runs.items() if results}
    return {"at": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "repeats": repeats, "duration_s": duration_s, "concurrency": concurrency,
            "tmpdir": tempfile.gettempdir(), "policies": summary, "stack": stack}


def section(res: dict[str, Any]) -> str:
    p = res["policies"]
    ratio = p["always"]["submits_per_s"] / p["everysec"]["submits_per_s"]
    rows = "\n".join(
        f"| `{name}` | {v['submits_per_s']:.0f} | {v['p50_ms']:.1f} ms | {v['p99_ms']:.1f} ms | "
        f"{', '.join(str(x) for x in v['runs'])} |" for name, v in p.items())
    return (f"Measured {res['at']} on {res['cpus']} CPUs, data on the file system of "
            f"`{res['tmpdir']}`: one gateway, the submit path alone (POST until its 202), "
            f"{res['concurrency']} clients in a closed loop, {res['duration_s']:.0f} s per run, "
            f"policies interleaved, medians of {res['repeats']} runs. `python -m bench.fsync`.\n\n"
            "| appendfsync | submits/s | p50 | p99 | runs (submits/s) |\n|---|---|---|---|---|\n"
            f"{rows}\n\n`always` keeps {ratio:.0%} of `everysec`'s submit throughput here."
            + stack_section(res))


def stack_section(res: dict[str, Any]) -> str:
    stack = res.get("stack") or {}
    if set(stack) != set(POLICIES):
        return ""
    rows = []
    for rate in stack["always"]:
        a, e = stack["always"][rate], stack["everysec"][rate]
        for name, v in (("always", a), ("everysec", e)):
            legs = v["legs_ms"]
            rows.append(f"| {rate} | `{name}` | {v['p50_ms']:.1f} ms | {v['p99_ms']:.1f} ms | "
                        f"{v['batch']:.1f} | {legs['queued']:.0f} / {legs['running']:.0f} / "
                        f"{legs['to_client']:.1f} ms |")
        rows.append(f"| {rate} | `everysec` ÷ `always` | {e['p50_ms'] / a['p50_ms']:.2f}× | "
                    f"{e['p99_ms'] / a['p99_ms']:.2f}× | | |")
    return ("\n\nThe whole stack (`asyncinfer up`, two MLP workers on 2 CPUs), open loop, submit "
            "+ long-poll, the same runs' medians; legs from the job records (whole "
            "milliseconds): submitted to started, started to finished, finished to the client.\n\n"
            "| jobs/s | appendfsync | p50 | p99 | batch | legs |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rates", default="200,400",
                    help="open-loop jobs/s of the whole-stack runs ('' skips them)")
    a = ap.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",") if r]
    res = measure(a.repeats, a.duration, a.concurrency, rates)
    emit_json(res, RESULTS / "fsync.json")
    text = section(res)
    if not replace_section(DOCS / "deployment.md", BEGIN, END, text):
        print("docs/deployment.md has no fsync markers; the section:", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
