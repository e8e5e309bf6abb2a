"""Soak: the whole stack under steady load at about 70% of its capacity for ~10 minutes, watching
for lost jobs and for memory that keeps growing. A benchmark, not a test (not run in CI).

    python -m bench.soak --docs                        # the full run: 10 min, writes docs/soak.md
    python -m bench.soak --duration-s 60               # a short development run (JSON only)

What runs: a private redis-server, the gateway, the batcher and the autoscaler, which keeps two
workers of the torch `mlp` model (min_workers = max_workers = 2, one per CPU slot); or, with
`--workers fixed`, two workers started directly. Finished job records expire after
`--result-ttl-s` (60 s here instead of the default hour), so Redis reaches its steady state
within the warm-up and a leak would show as growth after it.

1. Capacity: a closed-loop saturation probe (`--probe-concurrency` clients, each submitting a
   job and long-polling it to the end, then the next) for `--probe-s`; its throughput after the
   probe's own warm-up is the capacity.
2. Soak: open-loop Poisson arrivals at `--load` × capacity for `--duration-s`. Each arrival
   POSTs one job and, on 202, long-polls `GET /v1/jobs/{id}?wait=30` until the job is final;
   latency is from the scheduled arrival (so a generator that falls behind cannot hide queueing).
   Every `--sample-s` a sample records Redis INFO memory, the RSS (/proc/PID/status VmRSS) and CPU
   time of every process (gateway, batcher, autoscaler, each worker, redis, this generator), and
   the job counts: accepted (202), rejected, succeeded, failed, pending.
3. Drain: arrivals stop; every accepted job must reach a final state within `--drain-s`. A job
   still not final then is checked once more with a plain GET; lost = accepted, never final.

The report compares the sample at the end of the warm-up with the last sample under load
(ratios), writes JSON under bench/results/ and, with --docs, the results section of
docs/soak.md and docs/img/soak-timeline.png. The load generator shares the machine with the
stack (and, on a shared machine, with whatever else runs there): its CPU time is recorded too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from bench.autoscale_reaction import BenchStack, raise_on_sigterm
from bench.docs import DOCS, IMG, REPO, RESULTS, replace_section
from shared import keys
from shared.jobs import FINAL_STATUSES as FINAL

DOC = DOCS / "soak.md"
BEGIN = "<!-- soak:begin -->"
END = "<!-- soak:end -->"

MODEL = "mlp"
FEATURES = 256
LONG_POLL_S = 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


def models_toml(workers: str) -> str:
    n = 2 if workers == "autoscaler" else 0
    return f"""\
# Written by bench/soak.py: the torch mlp on two CPU slots.
[models.mlp]
class = "workers.builtin.mlp:MLPModel"
max_batch_size = 64
max_latency_ms = 250
min_workers = {n}
max_workers = 2
"""


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Counts:
    """Job outcomes seen by the generator. `latencies` are (finished at, seconds), drained by
    each sample."""

    arrived: int = 0
    accepted: int = 0
    rejected: int = 0
    succeeded: int = 0
    failed: int = 0  # final but not succeeded (failed, canceled, expired)
    statuses: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    max_lag_s: float = 0.0

    @property
    def pending(self) -> int:
        return self.accepted - self.succeeded - self.failed


class Load:
    """Submit-then-long-poll jobs over one keep-alive httpx client."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self.client = httpx.AsyncClient(
            base_url=url,
            limits=httpx.Limits(max_connections=2048, max_keepalive_connections=2048),
            # pool=None: under overload a job waits for a connection, it does not fail.
            timeout=httpx.Timeout(10.0, read=LONG_POLL_S + 15, pool=None))
        self.bodies = bodies
        self.unfinished: set[str] = set()
        self.drain_deadline = math.inf

    async def close(self) -> None:
        await self.client.aclose()

    async def job(self, counts: Counts, scheduled: float) -> None:
        """One job, from its (scheduled) arrival to its final state."""
        loop = asyncio.get_running_loop()
        counts.arrived += 1
        counts.max_lag_s = max(counts.max_lag_s, loop.time() - scheduled)
        body = self.bodies[counts.arrived % len(self.bodies)]
        try:
            r = await self.client.post(f"/v1/models/{MODEL}/jobs", content=body,
                                       headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            _bump(counts.rejections, type(exc).__name__)
            counts.rejected += 1
            return
        if r.status_code != 202:
            _bump(counts.rejections, f"{r.status_code} {_error_message(r)}")
            counts.rejected += 1
            return
        job_id = r.json()["id"]
        counts.accepted += 1
        self.unfinished.add(job_id)
        status = await self.final_status(job_id)
        if status is None:
            return  # the drain deadline passed: stays in `unfinished` for the final check
        self.unfinished.discard(job_id)
        _bump(counts.statuses, status)
        if status == "succeeded":
            counts.succeeded += 1
        else:
            counts.failed += 1
        counts.latencies.append((time.time(), loop.time() - scheduled))

    async def final_status(self, job_id: str) -> str | None:
        """Long-poll until the job is final; transport errors retry (the job is in Redis)."""
        loop = asyncio.get_running_loop()
        while loop.time() < self.drain_deadline:
            wait = max(0.0, min(LONG_POLL_S, self.drain_deadline - loop.time()))
            try:
                r = await self.client.get(f"/v1/jobs/{job_id}", params={"wait": round(wait, 1)})
            except httpx.HTTPError:
                await asyncio.sleep(0.5)
                continue
            if r.status_code == 200 and r.json()["status"] in FINAL:
                status: str = r.json()["status"]
                return status
            if r.status_code != 200:
                await asyncio.sleep(0.5)
        return None


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])[:80]
    except (ValueError, KeyError, TypeError):
        return r.text[:80]


def _bump(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


def bodies(n: int = 64, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [json.dumps({"input": {"features": [round(rng.uniform(-1, 1), 3)
                                               for _ in range(FEATURES)]}}).encode()
            for _ in range(n)]


async def probe(load: Load, concurrency: int, duration_s: float, warmup_s: float) -> float:
    """Closed loop: `concurrency` clients back to back; jobs/s completed after the warm-up."""
    counts = Counts()
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s

    async def client() -> None:
        while loop.time() < end:
            await load.job(counts, loop.time())

    start_wall = time.time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    measured = [t for t, _ in counts.latencies if t >= start_wall + warmup_s]
    if counts.rejected or counts.failed:
        print(f"probe: rejected {counts.rejections} failed {counts.statuses}", flush=True)
    return len(measured) / max(1e-9, (start_wall + duration_s) - (start_wall + warmup_s))


async def open_loop(load: Load, counts: Counts, rate: float, duration_s: float,
                    tasks: set[asyncio.Task[None]], seed: int = 1) -> None:
    """Poisson arrivals at `rate`/s for `duration_s`; each arrival is its own task."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    at = t0
    while True:
        at += rng.expovariate(rate)
        if at - t0 >= duration_s:
            return
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(load.job(counts, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


# -- sampling ----------------------------------------------------------------------------------


def proc_stats(pid: int) -> tuple[float, float] | None:
    """(RSS MiB from /proc/PID/status VmRSS, CPU seconds from /proc/PID/stat) or None if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss_kb = next((int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:")), 0)
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return rss_kb / 1024, cpu_s


async def processes(stack: BenchStack, r: aioredis.Redis) -> dict[str, int]:
    """Every process of the run by role; workers from their heartbeats (the autoscaler's
    children are not ours to list)."""
    pids = {name: pid for name, pid in stack.pids().items() if not name.startswith("worker-")}
    if stack.server is not None and stack.server.proc is not None:
        pids["redis"] = stack.server.proc.pid
    for raw in (await r.hgetall(keys.workers(MODEL))).values():
        hb = json.loads(raw)
        pids[f"worker-{hb['index']}"] = int(hb["pid"])
    pids["loadgen"] = os.getpid()
    return pids


async def sample(stack: BenchStack, r: aioredis.Redis, counts: Counts, t0: float,
                 last: dict[str, Any] | None) -> dict[str, Any]:
    mem = await r.info("memory")
    now = time.time()
    window = [lat for t, lat in counts.latencies]
    counts.latencies.clear()
    procs: dict[str, dict[str, float]] = {}
    for name, pid in (await processes(stack, r)).items():
        st = proc_stats(pid)
        if st is not None:
            procs[name] = {"pid": pid, "rss_mib": round(st[0], 1), "cpu_s": round(st[1], 2)}
    s: dict[str, Any] = {
        "t_s": round(now - t0, 2),
        "redis_used_memory_mib": round(int(mem["used_memory"]) / 2**20, 2),
        "redis_used_memory_rss_mib": round(int(mem["used_memory_rss"]) / 2**20, 2),
        "redis_keys": await r.dbsize(),
        "procs": procs,
        "arrived": counts.arrived, "accepted": counts.accepted, "rejected": counts.rejected,
        "succeeded": counts.succeeded, "failed": counts.failed, "pending": counts.pending,
        "loadavg": round(os.getloadavg()[0], 2),
        "latency_p50_ms": _pct(window, 50), "latency_p99_ms": _pct(window, 99),
        "max_lag_s": round(counts.max_lag_s, 3),
    }
    # A sample right after the previous one (the end of the load) says nothing about rates.
    if last is not None and s["t_s"] - last["t_s"] >= 1.0:
        dt = s["t_s"] - last["t_s"]
        s["throughput_per_s"] = round((s["succeeded"] - last["succeeded"]) / dt, 1)
        s["offered_per_s"] = round((s["arrived"] - last["arrived"]) / dt, 1)
    counts.max_lag_s = 0.0
    return s


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(len(values) * q / 100))], 1)


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Config:
    duration_s: float
    warmup_s: float
    load: float
    sample_s: float
    probe_s: float
    probe_concurrency: int
    drain_s: float
    result_ttl_s: int
    workers: str


async def soak(cfg: Config, stack: BenchStack) -> dict[str, Any]:
    r = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
    load = Load(stack.url, bodies())
    try:
        if cfg.workers == "fixed":
            for index in (1, 2):
                stack.spawn_worker(MODEL, index)
        await _wait_workers(r, 2, 180)
        print(f"probe: {cfg.probe_concurrency} closed-loop clients for {cfg.probe_s:.0f}s",
              flush=True)
        capacity = await probe(load, cfg.probe_concurrency, cfg.probe_s, cfg.probe_s / 3)
        rate = cfg.load * capacity
        print(f"capacity {capacity:.0f} jobs/s; soak at {rate:.0f} jobs/s for "
              f"{cfg.duration_s:.0f}s (warm-up {cfg.warmup_s:.0f}s)", flush=True)
        await asyncio.sleep(2.0)  # the probe's stragglers finish before the clock starts

        counts = Counts()
        tasks: set[asyncio.Task[None]] = set()
        samples: list[dict[str, Any]] = []
        t0 = time.time()
        loop = asyncio.get_running_loop()
        gen = asyncio.create_task(open_loop(load, counts, rate, cfg.duration_s, tasks))
        next_sample = loop.time()
        while not gen.done():
            samples.append(await sample(stack, r, counts, t0, samples[-1] if samples else None))
            s = samples[-1]
            print(f"t={s['t_s']:6.1f}s offered {s.get('offered_per_s', 0):6.1f}/s done "
                  f"{s.get('throughput_per_s', 0):6.1f}/s p99 {s['latency_p99_ms']} ms "
                  f"pending {s['pending']:4d} redis {s['redis_used_memory_mib']:.1f} MiB "
                  f"load {s['loadavg']:.1f}", flush=True)
            next_sample += cfg.sample_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(gen), max(0.0, next_sample - loop.time()))
        end_sample = await sample(stack, r, counts, t0, samples[-1] if samples else None)
        samples.append(end_sample)

        # Drain: every accepted job gets until the deadline to be final.
        load.drain_deadline = loop.time() + cfg.drain_s
        drain_t = time.time()
        if tasks:
            await asyncio.wait(set(tasks), timeout=cfg.drain_s + LONG_POLL_S)
        for task in tasks:
            task.cancel()
        drain_s = time.time() - drain_t
        late: dict[str, str] = {}
        for job_id in sorted(load.unfinished):  # never seen final by the long-poll: ask again
            with contextlib.suppress(httpx.HTTPError):
                late[job_id] = (await load.client.get(f"/v1/jobs/{job_id}")).json()["status"]
        lost = [j for j in load.unfinished if late.get(j) not in FINAL]
        samples.append(await sample(stack, r, counts, t0, samples[-1]))
        stats = {k: int(v) for k, v in (await r.hgetall(keys.stats(MODEL))).items()}
        return {
            "config": asdict(cfg), "capacity_jobs_s": round(capacity, 1),
            "rate_jobs_s": round(rate, 1), "samples": samples,
            "end_of_load_index": len(samples) - 2,
            "totals": {"arrived": counts.arrived, "accepted": counts.accepted,
                       "rejected": counts.rejected, "rejections": counts.rejections,
                       "succeeded": counts.succeeded, "failed": counts.failed,
                       "statuses": counts.statuses, "lost": len(lost), "lost_ids": lost[:100],
                       "late_final": {j: s for j, s in late.items() if s in FINAL},
                       "drain_s": round(drain_s, 2)},
            "redis_stats_all_runs": stats,
        }
    finally:
        await load.close()
        await r.aclose()


async def _wait_workers(r: aioredis.Redis, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        beats = [json.loads(v) for v in (await r.hgetall(keys.workers(MODEL))).values()]
        if sum(1 for b in beats if b["state"] in ("ready", "busy")) >= n:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{n} {MODEL} workers not ready after {timeout_s:.0f}s")


# -- report ------------------------------------------------------------------------------------


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Warm-up end vs end of load: Redis memory and each process's RSS, as ratios."""
    samples = result["samples"][:result["end_of_load_index"] + 1]
    warm_t = result["config"]["warmup_s"]
    warm = min(samples, key=lambda s: abs(s["t_s"] - warm_t))
    end = samples[-1]
    steady = [s for s in samples if s["t_s"] > warm["t_s"] and "throughput_per_s" in s]
    rss = {}
    for name, p in warm["procs"].items():
        e = end["procs"].get(name)
        if e is None:
            continue
        rss[name] = {"warm_mib": p["rss_mib"], "end_mib": e["rss_mib"],
                     "ratio": round(e["rss_mib"] / p["rss_mib"], 3),
                     "same_pid": e["pid"] == p["pid"],
                     "cpu_share": round((e["cpu_s"] - p["cpu_s"])
                                        / max(1e-9, end["t_s"] - warm["t_s"]), 3)}
    tput = [s["throughput_per_s"] for s in steady]
    p99 = [s["latency_p99_ms"] for s in steady if s["latency_p99_ms"] is not None]
    return {
        "warm_t_s": warm["t_s"], "end_t_s": end["t_s"],
        "redis_used_memory_mib": {"warm": warm["redis_used_memory_mib"],
                                  "end": end["redis_used_memory_mib"],
                                  "ratio": round(end["redis_used_memory_mib"]
                                                 / warm["redis_used_memory_mib"], 3),
                                  "max": max(s["redis_used_memory_mib"] for s in samples)},
        "redis_keys": {"warm": warm["redis_keys"], "end": end["redis_keys"]},
        "rss": rss,
        "throughput_per_s": {"median": _med(tput), "min": min(tput, default=None),
                             "max": max(tput, default=None)},
        "latency_p99_ms": {"median": _med(p99), "max": max(p99, default=None)},
        "pending_max": max(s["pending"] for s in samples),
        "max_lag_s": max(s["max_lag_s"] for s in samples),
        "loadavg": {"median": _med([s["loadavg"] for s in samples]),
                    "max": max(s["loadavg"] for s in samples)},
    }


def _med(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"][:result["end_of_load_index"] + 1]
    t = [s["t_s"] for s in samples]
    warm = result["summary"]["warm_t_s"]
    warm_sample = min(samples, key=lambda s: abs(s["t_s"] - warm))
    fig, axes = plt.subplots(4, 1, figsize=(8, 10.5), sharex=True)
    ax = axes[0]
    ax.plot(t, [s.get("offered_per_s") for s in samples], label="offered (jobs/s)", lw=1)
    ax.plot(t, [s.get("throughput_per_s") for s in samples], label="succeeded (jobs/s)", lw=1)
    ax.axhline(result["capacity_jobs_s"], color="grey", ls=":", lw=1, label="probed capacity")
    ax.set_ylabel("jobs/s")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(t, [s["latency_p99_ms"] for s in samples], color="tab:red", lw=0.8,
             label="p99 latency (ms)")
    ax2.set_ylabel("p99 latency (ms)", color="tab:red")
    ax2.set_ylim(bottom=0)
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title(f"soak: mlp at {result['config']['load']:.0%} of capacity "
                 f"({result['rate_jobs_s']:.0f} jobs/s), lost jobs: "
                 f"{result['totals']['lost']}", fontsize=10)
    ax = axes[1]
    ax.plot(t, [s["redis_used_memory_mib"] for s in samples], label="used_memory")
    ax.plot(t, [s["redis_used_memory_rss_mib"] for s in samples], label="used_memory_rss")
    ax.set_ylabel("Redis (MiB)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax = axes[2]
    names = sorted({n for s in samples for n in s["procs"]})
    for name in names:
        ax.plot(t, [s["procs"].get(name, {}).get("rss_mib") for s in samples], label=name)
    ax.set_ylabel("RSS (MiB)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=4)
    ax = axes[3]
    base = warm_sample["redis_used_memory_mib"]
    ax.plot(t, [s["redis_used_memory_mib"] / base for s in samples], color="k",
            label="Redis used_memory")
    for name in names:
        ref = warm_sample["procs"].get(name, {}).get("rss_mib")
        if ref:
            ax.plot(t, [s["procs"][name]["rss_mib"] / ref if name in s["procs"] else None
                        for s in samples], lw=0.9, label=f"RSS {name}")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_ylabel("÷ value at warm-up end")
    ax.legend(fontsize=7, ncol=3)
    ax.set_xlabel("seconds (dashed: end of warm-up)")
    for ax in axes:
        ax.axvline(warm, color="k", ls="--", lw=0.8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    s, tot, cfg = result["summary"], result["totals"], result["config"]
    mem = s["redis_used_memory_mib"]
    not_ok = {k: v for k, v in tot["statuses"].items() if k != "succeeded"}
    lines = [
        f"Measured {result['date']} on {result['machine']['cpus']} CPUs; "
        f"`python -m bench.soak --docs` ({cfg['duration_s']:.0f} s, warm-up "
        f"{cfg['warmup_s']:.0f} s, workers: {cfg['workers']}); raw data in `bench/results/`.",
        "",
        f"- **Capacity** (closed-loop probe, {cfg['probe_concurrency']} clients, "
        f"{cfg['probe_s']:.0f} s): {result['capacity_jobs_s']:.0f} jobs/s. "
        f"**Soak rate**: {result['rate_jobs_s']:.0f} jobs/s ({cfg['load']:.0%}).",
        f"- **Jobs**: {tot['arrived']} arrived, {tot['accepted']} accepted, "
        f"{tot['rejected']} rejected{_kv(tot['rejections'])}, {tot['succeeded']} succeeded, "
        f"{tot['failed']} failed{_kv(not_ok)}"
        f", **{tot['lost']} lost** (accepted, never final); the last job was final "
        f"{tot['drain_s']:.1f} s after the arrivals stopped.",
        f"- **Throughput** after the warm-up, per {cfg['sample_s']:.0f} s sample: median "
        f"{s['throughput_per_s']['median']} jobs/s (min {s['throughput_per_s']['min']}, max "
        f"{s['throughput_per_s']['max']}); p99 latency median {s['latency_p99_ms']['median']} ms,"
        f" worst sample {s['latency_p99_ms']['max']} ms; most jobs pending at once "
        f"{s['pending_max']}; the generator was at most {s['max_lag_s']:.2f} s behind its "
        f"schedule.",
        f"- **Machine**: load average median {s['loadavg']['median']}, max "
        f"{s['loadavg']['max']} on {result['machine']['cpus']} CPUs.",
        "",
        f"| at | warm-up end ({s['warm_t_s']:.0f} s) | end of load ({s['end_t_s']:.0f} s) "
        "| end / warm-up | CPU share |",
        "|---|---|---|---|---|",
        f"| Redis used_memory | {mem['warm']:.1f} MiB | {mem['end']:.1f} MiB | "
        f"**{mem['ratio']:.2f}** | |",
        f"| Redis keys | {s['redis_keys']['warm']} | {s['redis_keys']['end']} | "
        f"{s['redis_keys']['end'] / max(1, s['redis_keys']['warm']):.2f} | |",
    ]
    for name, v in sorted(s["rss"].items()):
        note = "" if v["same_pid"] else " (restarted)"
        lines.append(f"| RSS {name}{note} | {v['warm_mib']:.1f} MiB | {v['end_mib']:.1f} MiB | "
                     f"**{v['ratio']:.2f}** | {v['cpu_share']:.2f} |")
    lines += ["", "![soak timeline](img/soak-timeline.png)"]
    return "\n".join(lines)


def _kv(d: dict[str, int]) -> str:
    return f" ({', '.join(f'{k}: {v}' for k, v in d.items())})" if d else ""


def write_doc(section: str, doc: Path) -> bool:
    return replace_section(doc, BEGIN, END, section)


def main() -> None:
    """Run the soak and write JSON (and, with --docs, the plot and docs/soak.md)."""
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--warmup-s", type=float, default=None,
                    help="default: 120 s, or a third of a run shorter than 6 minutes")
    ap.add_argument("--load", type=float, default=0.7, help="fraction of the probed capacity")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--probe-s", type=float, default=30.0)
    ap.add_argument("--probe-concurrency", type=int, default=64)
    ap.add_argument("--drain-s", type=float, default=120.0)
    ap.add_argument("--result-ttl-s", type=int, default=60)
    ap.add_argument("--workers", choices=["autoscaler", "fixed"], default="autoscaler")
    ap.add_argument("--docs", action="store_true",
                    help="write docs/img/soak-timeline.png and the docs/soak.md section")
    args = ap.parse_args()
    warmup = args.warmup_s if args.warmup_s is not None else (
        120.0 if args.duration_s >= 360 else args.duration_s / 3)
    cfg = Config(duration_s=args.duration_s, warmup_s=warmup, load=args.load,
                 sample_s=args.sample_s, probe_s=args.probe_s,
                 probe_concurrency=args.probe_concurrency, drain_s=args.drain_s,
                 result_ttl_s=args.result_ttl_s, workers=args.workers)
    raise_on_sigterm()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    state_dir = RESULTS / f"soak-{stamp}"
    stack = BenchStack(state_dir, models_toml(cfg.workers),
                       extra_env={"ASYNCINFER_RESULT_TTL_S": str(cfg.result_ttl_s),
                                  "ASYNCINFER_LOG_LEVEL": "WARNING"})
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        stack.start(autoscaler=cfg.workers == "autoscaler")
        try:
            import uvloop

            result = uvloop.run(soak(cfg, stack))
        except ImportError:
            result = asyncio.run(soak(cfg, stack))
    finally:
        stack.stop()
    result["date"] = started
    result["machine"] = {"cpus": os.cpu_count()}
    result["summary"] = summarise(result)
    out = RESULTS / f"soak-{stamp}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"totals": result["totals"], "summary": result["summary"]}, indent=1))
    print(f"results: {out}; logs: {state_dir / 'logs'}")
    if args.docs:
        IMG.mkdir(parents=True, exist_ok=True)
        plot(result, IMG / "soak-timeline.png")
        if write_doc(markdown(result), DOC):
            print(f"updated {DOC.relative_to(REPO)}")
    if result["totals"]["lost"]:
        raise SystemExit(f"{result['totals']['lost']} jobs lost")


if __name__ == "__main__":
    main()
