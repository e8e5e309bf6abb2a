"""Profile and count the hot path: gateway submit, batcher, worker fetch/store.

Three parts, each a fresh set of processes:
- `micro`: in-process timings of the changed code against a private Redis (no HTTP): parsing
  one submit body, and the worker's run_batch for batches of 1, 16 and 64;
- `submit`: Redis + the gateway alone under a closed-loop submit load;
- `stack`: `asyncinfer up` (one mlp worker) under the job pattern (submit + long-poll), closed
  loop, then a light open-loop load for the latency legs.
For each: throughput, CPU per job of every process (from /proc), Redis commands per job (from
`INFO commandstats`: how many round trips each job costs), and with `--spy` a py-spy profile of
each process (top functions by own and inclusive samples).

`--before DIR` runs the same measurement, alternating, against another copy of the code (for
example a checkout of the previous commit): the before/after table of docs/benchmarks.md.

    python -m bench.profile_hotpath --spy                       # profile the code as it is
    python -m bench.profile_hotpath --before /tmp/old --repeats 3 --write-docs
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
from collections import Counter
from pathlib import Path
from typing import Any

from asyncinfer.loadgen import OK_STATUSES
from bench.docs import REPO, RESULTS
from bench.drive import write_bodies
from bench.systems import MODEL, GatewayOnly, OursStack, Server, cpu_delta, tree_cpu


def redis_url_of(server: Server) -> str:
    if isinstance(server, GatewayOnly) and server.redis is not None:
        return server.redis.url
    if isinstance(server, OursStack):
        return server.redis_url
    raise RuntimeError(f"{server.name} has no Redis of its own")


def commandstats(url: str) -> Counter[str]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("commandstats")
    finally:
        client.close()
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()})


def spy(pids: dict[str, int], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = []
    for name, pid in pids.items():
        procs.append(subprocess.Popen(
            [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "-f", "raw",
             "--nonblocking", "-o", str(out / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def summarize_spy(path: Path, top: int = 15) -> dict[str, Any]:
    """Own and inclusive sample shares of the functions in a py-spy raw (collapsed) file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1].split(":")[0]
                  if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return {}
    share = {k: round(100 * v / total, 1) for k, v in own.most_common(top)}
    boring = ("_run_module_as_main", "_run_code", "<module>", "main (", "run (", "Runner.",
              "Thread._bootstrap", "Thread.run", "BaseEventLoop.run", "asyncio_run")
    inclusive = {k: round(100 * v / total, 1) for k, v in incl.most_common(80)
                 if not k.startswith(boring)}
    return {"samples": total, "own_pct": share,
            "inclusive_pct": dict(list(inclusive.items())[:top * 2])}


def _pids(server: Server) -> dict[str, int]:
    assert server.proc is not None
    return {label: pid for pid, (label, _) in tree_cpu(server.proc.pid).items()
            if label in ("gateway", "batcher", "worker-1", "redis")}


def _loadgen(server: Server, bodies: Path, out: Path, protocol: str, mode: str,
             concurrency: int, rate: float, duration: float, env: dict[str, str]) -> Any:
    load = ["--concurrency", str(concurrency)] if mode == "closed" else ["--rate", str(rate)]
    cmd = [sys.executable, "-m", "asyncinfer.loadgen", "--url", server.url, "--model", MODEL,
           "--bodies", str(bodies), "--protocol", protocol, *load, "--duration", str(duration),
           "--warmup", "1", "--quiet", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return json.loads(out.read_text())


MICRO_CHILD = r"""
import asyncio, json, statistics, sys, time
code, url, bodies = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, code)
import torch
torch.set_num_threads(1)
import redis.asyncio as aioredis
import gateway.inputs as inputs
from shared.model import ModelContext
from shared.modelspec import load_specs
from shared import keys
from shared.store import JobStore, NewJob
from workers.runtime import BatchRequest, ModelRuntime
assert inputs.__file__.startswith(code), inputs.__file__
raw = open(bodies).readline().strip().encode()
spec = load_specs(None)["mlp"]
out = {}
def parse():
    env = inputs.envelope(inputs.parse_json(raw), inputs.SubmitBody)
    return inputs.new_jobs(spec, [(("input",), env.input)], env)
for _ in range(200):
    parse()
t = time.perf_counter()
for _ in range(3000):
    parse()
out["parse_us"] = (time.perf_counter() - t) / 3000 * 1e6
async def batches():
    r = aioredis.Redis.from_url(url, decode_responses=True)
    store = JobStore(r, result_ttl_s=60, job_ttl_s=60)
    consumer = keys.worker_consumer("micro")
    rt = ModelRuntime(spec, ModelContext(model="mlp", worker_index=1, device="cpu",
                                         worker_name="micro"), store, consumer=consumer)
    rt.load()
    job = parse()[0]
    streams = {s: ">" for s in keys.streams("mlp")}
    for s in streams:
        await r.xgroup_create(s, keys.BATCHER_GROUP, id="0", mkstream=True)
    for n in (1, 16, 64):
        times = []
        for i in range(220 if n < 64 else 80):
            sub = await store.submit("mlp", [job] * n, max_queue=10**9)
            # Held by the worker's consumer, as after a dispatch (START runs only those).
            await r.xreadgroup(keys.BATCHER_GROUP, consumer, streams)
            t0 = time.perf_counter()
            await rt.run_batch(BatchRequest("mlp", f"b{n}-{i}", sub.ids))
            times.append(time.perf_counter() - t0)
        out[f"run_batch_{n}_ms"] = statistics.median(times[20:]) * 1000
    await r.flushall()
asyncio.run(batches())
print(json.dumps(out))
"""


def measure_micro(code: Path, work: Path) -> dict[str, Any]:
    """In-process timings of the changed code, no HTTP: parse + validate + encode of one submit
    body, and the worker's run_batch (fetch, pre/predict/post, store) for batches of 1, 16, 64
    against a private Redis. Much steadier than end-to-end figures on a shared machine."""
    from shared.redisserver import RedisServer

    bodies, _ = write_bodies(work)
    server = RedisServer(work / "redis", appendonly=False).start()
    try:
        proc = subprocess.run([sys.executable, "-c", MICRO_CHILD, str(code), server.url,
                               str(bodies)], capture_output=True, text=True, check=True,
                              cwd=work)
    finally:
        server.stop()
    result: dict[str, Any] = {"part": "micro", "code": str(code)}
    result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def measure(part: str, code: Path, work: Path, duration: float, with_spy: bool) -> dict[str, Any]:
    """One measurement of `part` with the code at `code` (a repository root)."""
    if part == "micro":
        return measure_micro(code, work)
    env = {**os.environ, "PYTHONPATH": str(code)}
    old_env = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(code)  # the servers this process spawns import from `code`
    bodies, _ = write_bodies(work)
    result: dict[str, Any] = {"part": part, "code": str(code)}
    server: Server = (GatewayOnly(work / "gw", cwd=code) if part == "submit"
                      else OursStack(work / "stack", devices="cpu:1", workers=1, cwd=code))
    try:
        with server:
            _loadgen(server, bodies, work / "warm.json", "submit" if part == "submit" else "jobs",
                     "closed", 64, 0, 3, env)
            if isinstance(server, OursStack):
                server.wait_idle(60)
            url = redis_url_of(server)
            stats0 = commandstats(url)
            assert server.proc is not None
            cpu0 = tree_cpu(server.roots())
            spies = spy(_pids(server), duration - 2, work) if with_spy else []
            r = _loadgen(server, bodies, work / "run.json",
                         "submit" if part == "submit" else "jobs", "closed", 64, 0, duration,
                         env)
            for s in spies:
                s.wait(30)
            if isinstance(server, OursStack):
                server.wait_idle(60)
            cpu = cpu_delta(cpu0, tree_cpu(server.roots()))
            stats = commandstats(url) - stats0
            jobs = sum(v for k, v in r["status_counts"].items()
                       if k in OK_STATUSES or k.startswith("http_"))
            total_jobs = max(1, r["jobs_total"])
            result.update(
                throughput=r["throughput_per_s"], statuses=r["status_counts"],
                batch=r["batch_size"]["mean"], jobs=jobs,
                cpu_us_per_job={k: round(1e6 * v / total_jobs, 1) for k, v in cpu.items()
                                if v > 0.01},
                redis_calls_per_job={k: round(v / total_jobs, 3) for k, v in stats.items()
                                     if v / total_jobs >= 0.01},
            )
            hist = {int(k): v for k, v in r["batch_size"]["hist"].items()}
            if hist:
                # The histogram counts jobs by the size of their batch: batches = Σ jobs/size,
                # scaled from the measured window to the whole run.
                batches = sum(v / k for k, v in hist.items()) * total_jobs / sum(hist.values())
                result["batches"] = batches
                result["redis_calls_per_batch"] = {
                    k: round(v / batches, 2) for k, v in stats.items()
                    if k in ("script|exists", "evalsha", "xadd", "publish", "lpush", "brpop")}
            if part == "stack":
                light = _loadgen(server, bodies, work / "light.json", "jobs", "open", 0, 20,
                                 duration, env)
                result["light_p50_ms"] = light["latency_ms"]["p50"]
                result["light_breakdown_ms"] = light["breakdown_ms"]
            if with_spy:
                result["profiles"] = {name: summarize_spy(work / f"{name}.txt")
                                      for name in ("gateway", "batcher", "worker-1", "redis")}
    finally:
        if old_env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_env
    return result


def table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown before/after table from alternating measurements."""

    def med(label: str, part: str, fn: Any) -> float | None:
        vals = [fn(m) for m in rows[label] if m["part"] == part]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    def cpu(proc: str) -> Any:
        return lambda m: m["cpu_us_per_job"].get(proc)

    lines = ["| figure | before | after |", "|---|---|---|"]
    spec: list[tuple[str, str, Any, str]] = [
        ("in-process: parse + validate + encode one submit body (µs)", "micro",
         lambda m: m["parse_us"], "{:.1f}"),
        ("in-process: worker run_batch, 1 job (ms)", "micro",
         lambda m: m["run_batch_1_ms"], "{:.2f}"),
        ("in-process: worker run_batch, 16 jobs (ms)", "micro",
         lambda m: m["run_batch_16_ms"], "{:.2f}"),
        ("in-process: worker run_batch, 64 jobs (ms)", "micro",
         lambda m: m["run_batch_64_ms"], "{:.2f}"),
        ("gateway alone: submits/s (C=64)", "submit", lambda m: m["throughput"], "{:,.0f}"),
        ("gateway alone: gateway CPU µs per submit", "submit", cpu("gateway"), "{:,.0f}"),
        ("gateway alone: Redis CPU µs per submit", "submit", cpu("redis"), "{:,.0f}"),
        ("gateway alone: Redis commands per submit", "submit",
         lambda m: sum(m["redis_calls_per_job"].values()), "{:.2f}"),
        ("stack: jobs/s (C=64, submit + long-poll)", "stack", lambda m: m["throughput"],
         "{:,.0f}"),
        ("stack: mean batch size", "stack", lambda m: m["batch"], "{:.1f}"),
        ("stack: gateway CPU µs per job", "stack", cpu("gateway"), "{:,.0f}"),
        ("stack: worker CPU µs per job", "stack", cpu("worker-1"), "{:,.0f}"),
        ("stack: batcher CPU µs per job", "stack", cpu("batcher"), "{:,.0f}"),
        ("stack: Redis CPU µs per job", "stack", cpu("redis"), "{:,.0f}"),
        ("stack: `SCRIPT EXISTS` per batch", "stack",
         lambda m: (m.get("redis_calls_per_batch") or {}).get("script|exists", 0.0), "{:.2f}"),
        ("stack: Redis commands per job (all)", "stack",
         lambda m: sum(m["redis_calls_per_job"].values()), "{:.2f}"),
        ("stack: p50 latency at 20 jobs/s (ms)", "stack", lambda m: m.get("light_p50_ms"),
         "{:.1f}"),
    ]
    for name, part, fn, fmt in spec:
        b, a = med("before", part, fn), med("after", part, fn)
        if b is None and a is None:
            continue
        lines.append(f"| {name} | {'–' if b is None else fmt.format(b)} | "
                     f"{'–' if a is None else fmt.format(a)} |")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    from bench.reporttext import PROFILE_END, PROFILE_START

    path = REPO / "docs" / "benchmarks.md"
    block = f"{PROFILE_START}\n{text}\n{PROFILE_END}"
    old = path.read_text() if path.exists() else ""
    if PROFILE_START in old and PROFILE_END in old:
        new = old[:old.index(PROFILE_START)] + block + old[old.index(PROFILE_END)
                                                           + len(PROFILE_END):]
    else:
        new = old + "\n" + block + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="micro,submit,stack")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--spy", action="store_true", help="py-spy each process meanwhile")
    ap.add_argument("--before", type=Path, help="another copy of the code to compare against")
    ap.add_argument("--write-docs", action="store_true",
                    help="put the before/after table into docs/benchmarks.md")
    ap.add_argument("--table-from", type=Path, help="only redo the table from a profile.json")
    a = ap.parse_args(argv)
    if a.table_from:
        text = table(json.loads(a.table_from.read_text()))
        print(text)
        if a.write_docs:
            write_docs(text)
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"profile-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    codes = {"after": REPO}
    if a.before:
        codes = {"before": a.before.resolve(), "after": REPO}
    rows: dict[str, list[dict[str, Any]]] = {k: [] for k in codes}
    for rep in range(a.repeats):
        for part in a.parts.split(","):
            for label, code in codes.items():
                work = out / f"{rep}-{part}-{label}"
                work.mkdir(parents=True, exist_ok=True)
                print(f"profile: {part} {label} (repeat {rep + 1})", file=sys.stderr, flush=True)
                m = measure(part, code, work, a.duration, a.spy)
                rows[label].append(m)
                print(json.dumps({k: v for k, v in m.items() if k != "profiles"}),
                      file=sys.stderr, flush=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=1))
    if a.before:
        text = table(rows)
        print(text)
        if a.write_docs:
            write_docs(text)
    print(f"profile results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
