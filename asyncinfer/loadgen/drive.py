"""The run: arrivals (open loop) or clients (closed loop) issuing jobs, and what they recorded.

Open loop: jobs arrive at a set rate whatever happened to the earlier ones, Poisson or evenly
spaced, and latency counts from the scheduled arrival, not from the moment the generator got
round to it, so neither a slow generator nor a slow server hides queueing (no coordinated
omission). Closed loop: C clients, each sending its next job when its last one is over.
"""

from __future__ import annotations

import asyncio
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from asyncinfer.benchview import BenchProgress, ProgressView, Sample
from asyncinfer.loadgen.http import HTTPError, RawClient
from asyncinfer.loadgen.protocols import JobFn, Outcome, make_protocol
from asyncinfer.loadgen.stats import OK_STATUSES, Done, summarize


@dataclass
class Config:
    """One run. `path` is the submit path (`/v1/models/{model}/jobs`); `slo_ms` adds goodput
    (jobs/s that succeeded within it) to the summary."""

    url: str
    path: str
    protocol: str = "jobs"
    mode: str = "open"  # open | closed
    arrivals: str = "poisson"  # open loop: poisson | fixed
    rate: float = 100.0
    concurrency: int = 64
    duration_s: float = 10.0
    warmup_s: float = 2.0
    drain_s: float = 15.0
    wait_s: float = 30.0
    max_inflight: int = 2048
    timeout_s: float = 60.0
    slo_ms: float | None = None
    seed: int = 1
    label: str = ""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorder:
    t0: float
    wall0: float = 0.0  # time.time() at t0: job records carry wall-clock times
    arrivals: list[float] = field(default_factory=list)
    done: list[Done] = field(default_factory=list)
    requests: int = 0
    inflight: int = 0
    dropped: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    lags: list[float] = field(default_factory=list)  # open loop: sent - scheduled, seconds

    def record(self, arrived: float, finished: float, outcome: Outcome) -> None:
        self.done.append((arrived - self.t0, finished - self.t0, outcome.status,
                          outcome.batch_size, outcome.spans))
        self.requests += outcome.requests
        if outcome.detail and outcome.status not in self.errors:
            self.errors[outcome.status] = outcome.detail


async def issue(fn: JobFn, body: bytes, arrived: float, rec: Recorder) -> Outcome:
    """Run one job to its end and record it; transport failures become outcomes."""
    rec.inflight += 1
    try:
        outcome = await fn(body)
    except HTTPError as exc:
        kind = "timeout" if str(exc) == "timeout" else ("error" if exc.sent else "unreachable")
        outcome = Outcome(kind, detail=str(exc)[:300])
    except (ValueError, KeyError) as exc:  # a malformed answer
        outcome = Outcome(f"bad_answer:{type(exc).__name__}", detail=str(exc)[:300])
    finally:
        rec.inflight -= 1
    rec.record(arrived, time.perf_counter(), outcome)
    return outcome


Bodies = Callable[[int], bytes]


def _spawn(tasks: set[asyncio.Task[Any]], coro: Any) -> None:
    task = asyncio.create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def open_loop(cfg: Config, fn: JobFn, body: Bodies, rec: Recorder,
                    tasks: set[asyncio.Task[Any]], stop: asyncio.Event | None = None) -> None:
    """Arrivals until `duration_s` (or `stop`); each job runs in a task of its own."""
    rng = random.Random(cfg.seed)
    end = rec.t0 + cfg.duration_s
    i = 0
    nxt = rec.t0
    while stop is None or not stop.is_set():
        nxt = (nxt + rng.expovariate(cfg.rate) if cfg.arrivals == "poisson"
               else rec.t0 + i / cfg.rate)
        if nxt >= end:
            break
        delay = nxt - time.perf_counter()
        if delay > 0.0005:
            if stop is None:
                await asyncio.sleep(delay)
            else:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
        rec.arrivals.append(nxt - rec.t0)
        if rec.inflight >= cfg.max_inflight:
            rec.dropped += 1
            rec.done.append((nxt - rec.t0, nxt - rec.t0, "dropped", None, None))
            i += 1
            continue
        rec.lags.append(time.perf_counter() - nxt)
        _spawn(tasks, issue(fn, body(i), nxt, rec))
        i += 1


async def closed_loop(cfg: Config, fn: JobFn, body: Bodies, rec: Recorder,
                      tasks: set[asyncio.Task[Any]]) -> None:
    """`concurrency` clients back to back until `duration_s`."""
    end = rec.t0 + cfg.duration_s

    async def client(k: int) -> None:
        i = k
        while time.perf_counter() < end:
            now = time.perf_counter()
            rec.arrivals.append(now - rec.t0)
            await issue(fn, body(i), now, rec)
            i += cfg.concurrency

    for k in range(cfg.concurrency):
        _spawn(tasks, client(k))
    await asyncio.sleep(cfg.duration_s)


class _Progress:
    """Feeds `asyncinfer.benchview` a snapshot a second (a bar rewritten on a terminal, else a
    line now and then), and a last one when the run is over."""

    def __init__(self, cfg: Config, rec: Recorder, stream: TextIO) -> None:
        self.rec, self.view, self.duration_s = rec, ProgressView(stream), cfg.duration_s
        self.label = cfg.label or (f"{cfg.protocol} open {cfg.rate:g}/s" if cfg.mode == "open"
                                   else f"{cfg.protocol} closed C={cfg.concurrency}")
        self.last_n, self.last_t = 0, rec.t0
        self.counts: Counter[str] = Counter()

    def line(self, end: str = "") -> None:
        rec, now = self.rec, time.perf_counter()
        n = len(rec.done)
        fresh = rec.done[self.last_n:n]
        self.counts.update(d[2] for d in fresh)
        ok_now = sum(1 for d in fresh if d[2] in OK_STATUSES)
        rate = ok_now / max(1e-9, now - self.last_t)
        self.last_n, self.last_t = n, now
        recent = sorted(d[1] - d[0] for d in rec.done[-500:] if d[2] in OK_STATUSES)
        ok = sum(self.counts[s] for s in OK_STATUSES)
        rejected = self.counts["http_429"]
        self.view(BenchProgress(
            elapsed_s=now - rec.t0, duration_s=self.duration_s, sent=n + rec.inflight, done=n,
            ok=ok, rejected=rejected, failed=n - ok - rejected, throughput_per_s=rate,
            p50_ms=percentile_ms(recent, 0.50), p99_ms=percentile_ms(recent, 0.99),
            label=self.label), final=bool(end))
        if end:
            self.view.close()

    async def every_second(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.line()


def cpu_s() -> float:
    """CPU seconds this process has used (user + system)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def percentile_ms(ascending_s: list[float], q: float) -> float | None:
    return ascending_s[min(len(ascending_s) - 1, int(q * len(ascending_s)))] * 1000 \
        if ascending_s else None


async def run(cfg: Config, body: Bodies, progress: TextIO | None = sys.stderr,
              samples: list[Sample] | None = None) -> dict[str, Any]:
    """One run from start to summary (see stats.summarize for its fields); `samples`, when
    given, receives every job (for `asyncinfer.benchview.plot`)."""
    max_conn = cfg.concurrency if cfg.mode == "closed" else cfg.max_inflight
    client = RawClient(cfg.url, max_conn, cfg.timeout_s, cfg.headers)
    fn = make_protocol(cfg.protocol, client, cfg.path, cfg.wait_s)
    tasks: set[asyncio.Task[Any]] = set()
    cpu0 = cpu_s()
    rec = Recorder(t0=time.perf_counter(), wall0=time.time())
    shown = _Progress(cfg, rec, progress) if progress is not None else None
    reporter = asyncio.create_task(shown.every_second()) if shown is not None else None
    try:
        if cfg.mode == "open":
            await open_loop(cfg, fn, body, rec, tasks)
        elif cfg.mode == "closed":
            await closed_loop(cfg, fn, body, rec, tasks)
        else:
            raise ValueError(f"unknown mode {cfg.mode!r}")
        if tasks:
            await asyncio.wait(set(tasks), timeout=cfg.drain_s)
        unfinished_at = time.perf_counter()
        cpu = cpu_s() - cpu0
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if reporter is not None and shown is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            shown.line(end="\n")
        await client.close()
    if samples is not None:
        samples += [Sample(d[0], (d[1] - d[0]) * 1000 if d[2] in OK_STATUSES else None, d[2])
                    for d in rec.done]
    return summarize(cfg, rec, unfinished_at - rec.t0, cpu, unfinished_at, client.retries)


def run_blocking(cfg: Config, body: Bodies, progress: TextIO | None = sys.stderr,
                 samples: list[Sample] | None = None) -> dict[str, Any]:
    """`run` on a fresh event loop, uvloop's where installed (it halves the generator's CPU)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run(cfg, body, progress, samples))
