"""Load generator: open loop (Poisson arrivals at a set rate) or closed loop (C clients).

One job is, by protocol:
- `jobs`: POST the submit path; a 202 gives the job id, then GET /v1/jobs/{id}?wait=N until the
  job is final (a 200 with a final job ends it at once). asyncinfer's own contract.
- `jobs-wait`: the same with `Prefer: wait=N` on the submit, which answers 200 with the finished
  job when it finishes in time: one request per job.
- `submit`: the POST alone; done at its 202 (the gateway's submit path).
- `sync`: one POST whose 200 carries the result (BentoML's synchronous endpoint).

Latency is from the job's arrival to its final answer. In the open loop the arrival is the
scheduled Poisson time, not the moment the generator got round to it, so a slow generator or
server cannot hide queueing (no coordinated omission). Statistics cover the jobs that arrived
after the warm-up; throughput counts successful completions inside the measured window.

The generator runs in its own process on uvloop with a keep-alive HTTP/1.1 connection pool. Two
clients: `raw` (a small HTTP/1.1 client on asyncio streams, the default: it costs a few tens of
microseconds per request) and `httpx` (the library; several times the CPU per request). Results
go to a JSON file; a progress line goes to stderr.

    python -m bench.loadgen --url http://127.0.0.1:8000 --path /v1/models/mlp/jobs \
        --bodies bodies.jsonl --mode open --rate 200 --duration 10 --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench.docs import emit_json
from shared.jobs import FINAL_STATUSES as FINAL


class HTTPError(Exception):
    """A transport failure (connection reset, timeout, malformed answer)."""


class Client(Protocol):
    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


# -- the raw HTTP/1.1 client ------------------------------------------------------------------


class _Conn:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class RawClient:
    """Keep-alive HTTP/1.1 over a pool of asyncio stream connections. Handles Content-Length and
    chunked answers; a stale reused connection is retried once on a fresh one."""

    def __init__(self, base_url: str, max_connections: int, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout_s = timeout_s
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()
        self.retries = 0

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return _Conn(reader, writer)

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        if body is not None:
            head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode())
        head.append(b"\r\n")
        data = b"".join(head) + (body or b"")
        async with self._slots:
            for attempt in range(2):
                # A retry always gets a fresh connection: the other idle ones may be stale too.
                try:
                    conn = (self._idle.pop() if self._idle and attempt == 0
                            else await self._connect())
                except OSError as exc:
                    raise HTTPError(f"connect: {type(exc).__name__}: {exc}") from exc
                try:
                    # asyncio.timeout, not wait_for: wait_for wraps the exchange in a task of
                    # its own, which cost the generator about a quarter of its CPU per request.
                    async with asyncio.timeout(self.timeout_s):
                        status, payload, keep = await self._exchange(conn, data)
                except (OSError, asyncio.IncompleteReadError, ValueError,
                        asyncio.LimitOverrunError) as exc:
                    conn.close()
                    if conn.reused and attempt == 0:
                        self.retries += 1
                        continue  # the server closed an idle keep-alive connection: retry
                    raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
                except TimeoutError as exc:
                    conn.close()
                    raise HTTPError("timeout") from exc
                except BaseException:
                    conn.close()
                    raise
                if keep:
                    conn.reused = True
                    self._idle.append(conn)
                else:
                    conn.close()
                return status, payload
        raise HTTPError("unreachable")

    @staticmethod
    async def _exchange(conn: _Conn, data: bytes) -> tuple[int, bytes, bool]:
        conn.writer.write(data)
        reader = conn.reader
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise ValueError(f"bad status line {lines[0][:80]!r}") from exc
        length = -1
        chunked = False
        keep = True
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep = b"close" not in value.lower()
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size + 2))
            return status, b"".join(p[:-2] for p in parts), keep
        if length >= 0:
            return status, await reader.readexactly(length), keep
        return status, await reader.read(), False

    async def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class HttpxClient:
    """The same interface on httpx.AsyncClient (HTTP/1.1, keep-alive pool)."""

    def __init__(self, base_url: str, max_connections: int, timeout_s: float) -> None:
        import httpx

        self._httpx = httpx
        self.client = httpx.AsyncClient(
            base_url=base_url, timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        hdrs = dict(headers or {})
        if body is not None:
            hdrs["content-type"] = "application/json"
        try:
            r = await self.client.request(method, path, content=body, headers=hdrs)
        except self._httpx.HTTPError as exc:
            raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
        return r.status_code, r.content

    async def close(self) -> None:
        await self.client.aclose()


def make_client(kind: str, base_url: str, max_connections: int, timeout_s: float) -> Client:
    if kind == "raw":
        return RawClient(base_url, max_connections, timeout_s)
    if kind == "httpx":
        return HttpxClient(base_url, max_connections, timeout_s)
    raise ValueError(f"unknown client {kind!r}")


# -- one job per protocol ---------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # succeeded, failed, ..., http_429, error
    batch_size: int | None = None
    requests: int = 1
    detail: str = ""
    spans: tuple[float, float, float] | None = None  # created, started, finished (epoch s)


JobFn = Callable[[bytes], Awaitable[Outcome]]


def _batch_size(job: dict[str, Any]) -> int | None:
    metrics = job.get("metrics") or {}
    size = metrics.get("batch_size")
    return int(size) if isinstance(size, int | float) else None


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _spans(job: dict[str, Any]) -> tuple[float, float, float] | None:
    created, started, finished = (_epoch(job.get(k)) for k in ("created_at", "started_at",
                                                                "finished_at"))
    if created is None or started is None or finished is None:
        return None
    return created, started, finished


def _detail(payload: bytes) -> str:
    return payload[:300].decode(errors="replace")


def job_protocol(client: Client, path: str, wait_s: float, prefer_wait: bool = False) -> JobFn:
    """Submit, then long-poll until final. With `prefer_wait` the submit itself carries
    `Prefer: wait=N` and usually answers 200 with the finished job (one request per job)."""
    headers = {"Prefer": f"wait={wait_s:g}"} if prefer_wait else None

    async def run(body: bytes) -> Outcome:
        status, payload = await client.request("POST", path, body, headers)
        if status not in (200, 202):
            return Outcome(f"http_{status}", detail=_detail(payload))
        job = json.loads(payload)
        requests = 1
        while job.get("status") not in FINAL:
            status, payload = await client.request("GET", f"/v1/jobs/{job['id']}?wait={wait_s}")
            requests += 1
            if status != 200:
                return Outcome(f"http_{status}", requests=requests, detail=_detail(payload))
            job = json.loads(payload)
        return Outcome(str(job["status"]), _batch_size(job), requests, spans=_spans(job))

    return run


def submit_protocol(client: Client, path: str) -> JobFn:
    async def run(body: bytes) -> Outcome:
        status, payload = await client.request("POST", path, body)
        if status in (200, 202):
            return Outcome("succeeded")
        return Outcome(f"http_{status}", detail=_detail(payload))

    return run


def sync_protocol(client: Client, path: str) -> JobFn:
    async def run(body: bytes) -> Outcome:
        status, payload = await client.request("POST", path, body)
        if status == 200:
            return Outcome("succeeded")
        return Outcome(f"http_{status}", detail=_detail(payload))

    return run


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Config:
    url: str
    path: str
    protocol: str = "jobs"
    mode: str = "open"
    rate: float = 100.0
    concurrency: int = 64
    duration_s: float = 10.0
    warmup_s: float = 2.0
    drain_s: float = 15.0
    wait_s: float = 30.0
    max_inflight: int = 2048
    client: str = "raw"
    timeout_s: float = 60.0
    seed: int = 1
    label: str = ""


Done = tuple[float, float, str, int | None, tuple[float, float, float] | None]


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


async def _one(fn: JobFn, body: bytes, arrived: float, rec: Recorder) -> None:
    rec.inflight += 1
    try:
        outcome = await fn(body)
    except HTTPError as exc:
        kind = "timeout" if str(exc) == "timeout" else "error"
        outcome = Outcome(kind, detail=str(exc)[:300])
    except (ValueError, KeyError) as exc:  # a malformed answer
        outcome = Outcome(f"bad_answer:{type(exc).__name__}", detail=str(exc)[:300])
    finally:
        rec.inflight -= 1
    rec.record(arrived, time.perf_counter(), outcome)


async def _open_loop(cfg: Config, fn: JobFn, bodies: list[bytes], rec: Recorder,
                     tasks: set[asyncio.Task[None]]) -> None:
    rng = random.Random(cfg.seed)
    end = rec.t0 + cfg.duration_s
    nxt = rec.t0
    i = 0
    while True:
        nxt += rng.expovariate(cfg.rate)
        if nxt >= end:
            break
        delay = nxt - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        rec.arrivals.append(nxt - rec.t0)
        if rec.inflight >= cfg.max_inflight:
            rec.dropped += 1
            rec.done.append((nxt - rec.t0, nxt - rec.t0, "dropped", None, None))
            continue
        rec.lags.append(time.perf_counter() - nxt)
        task = asyncio.create_task(_one(fn, bodies[i % len(bodies)], nxt, rec))
        i += 1
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _closed_loop(cfg: Config, fn: JobFn, bodies: list[bytes], rec: Recorder,
                       tasks: set[asyncio.Task[None]]) -> None:
    end = rec.t0 + cfg.duration_s

    async def client_loop(k: int) -> None:
        i = k
        while time.perf_counter() < end:
            now = time.perf_counter()
            rec.arrivals.append(now - rec.t0)
            await _one(fn, bodies[i % len(bodies)], now, rec)
            i += cfg.concurrency

    for k in range(cfg.concurrency):
        task = asyncio.create_task(client_loop(k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.sleep(cfg.duration_s)


async def _progress(cfg: Config, rec: Recorder, stream: Any) -> None:
    tty = stream.isatty()
    label = cfg.label or f"{cfg.protocol} {cfg.mode}"
    last_n, last_t = 0, time.perf_counter()
    while True:
        await asyncio.sleep(1.0)
        now = time.perf_counter()
        n = len(rec.done)
        rate = (n - last_n) / max(1e-9, now - last_t)
        last_n, last_t = n, now
        recent = sorted(d[1] - d[0] for d in rec.done[-500:] if d[2] == "succeeded")
        p50 = recent[len(recent) // 2] * 1000 if recent else float("nan")
        errors = sum(1 for d in rec.done[-2000:] if d[2] != "succeeded")
        line = (f"[{label}] t={now - rec.t0:5.1f}s done={n} rate={rate:7.1f}/s "
                f"inflight={rec.inflight} p50={p50:7.1f}ms errors(last)={errors}")
        if tty:
            stream.write("\r" + line[:150].ljust(150))
        else:
            stream.write(line + "\n")
        stream.flush()


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {k: None for k in ("p50", "p90", "p99", "p999", "mean", "max")}
    s = sorted(values)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
            "mean": sum(s) / len(s), "max": s[-1]}


def _breakdown(rec: Recorder, done: list[Done]) -> dict[str, float] | None:
    """Median time of each leg of a job, from the job record's wall-clock stamps (ms
    resolution): client to gateway record, queued (batcher, Celery, worker pick-up), running
    (worker: fetch, pre/predict/post, write), final state to the client's answer."""
    legs: dict[str, list[float]] = {"to_record": [], "queued": [], "running": [],
                                    "to_client": []}
    for arrived, finished, _, _, spans in done:
        if spans is None:
            continue
        created, started, final = spans
        legs["to_record"].append(created - (rec.wall0 + arrived))
        legs["queued"].append(started - created)
        legs["running"].append(final - started)
        legs["to_client"].append(rec.wall0 + finished - final)
    if not legs["queued"]:
        return None
    return {k: statistics.median(v) * 1000 for k, v in legs.items()}


def summarize(cfg: Config, rec: Recorder, elapsed_s: float, cpu_s: float,
              unfinished_at: float, retries: int = 0) -> dict[str, Any]:
    lo, hi = cfg.warmup_s, cfg.duration_s
    window = max(1e-9, hi - lo)
    measured = [d for d in rec.done if lo <= d[0] < hi]
    ok_in_window = sum(1 for d in rec.done if d[2] == "succeeded" and lo <= d[1] < hi)
    statuses = Counter(d[2] for d in measured)
    lat_ok = [(d[1] - d[0]) * 1000 for d in measured if d[2] == "succeeded"]
    arrived = sum(1 for a in rec.arrivals if lo <= a < hi)
    unfinished = max(0, arrived - len(measured))
    statuses["unfinished"] += unfinished
    # Latency with unfinished jobs counted as (end of the drain - arrival): a lower bound.
    unfinished_lat = [(unfinished_at - rec.t0 - lo) * 1000] * unfinished
    sizes = Counter(d[3] for d in measured if d[3] is not None)
    n_sizes = sum(sizes.values())
    completed_all = len(rec.done)
    result: dict[str, Any] = {
        "breakdown_ms": _breakdown(rec, [d for d in measured if d[2] == "succeeded"]),
        "config": asdict(cfg),
        "elapsed_s": elapsed_s,
        "window_s": window,
        "arrived": arrived,
        "offered_per_s": arrived / window,
        "completed": len(measured),
        "throughput_per_s": ok_in_window / window,
        "status_counts": dict(statuses),
        "ok_fraction": (statuses.get("succeeded", 0) / arrived) if arrived else 0.0,
        "latency_ms": _percentiles(lat_ok),
        "latency_ms_with_unfinished": _percentiles(lat_ok + unfinished_lat),
        "batch_size": {
            "mean": (sum(k * v for k, v in sizes.items()) / n_sizes) if n_sizes else None,
            "hist": {str(k): v for k, v in sorted(sizes.items())},
        },
        # How late the generator itself issued open-loop arrivals (its own share of latency).
        "issue_lag_ms": {k: v for k, v in _percentiles([x * 1000 for x in rec.lags]).items()
                         if k in ("p50", "p99", "max")},
        "dropped": rec.dropped,
        "error_samples": rec.errors,
        "requests": rec.requests,
        "client_retries": retries,
        "client_cpu_s": cpu_s,
        "client_cpu_us_per_request": (cpu_s / rec.requests * 1e6) if rec.requests else None,
        "client_cpu_fraction": cpu_s / elapsed_s if elapsed_s else None,
        "jobs_total": completed_all,
        "succeeded_total": sum(1 for d in rec.done if d[2] == "succeeded"),
    }
    return result


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run(cfg: Config, bodies: list[bytes], progress: bool = True) -> dict[str, Any]:
    max_conn = cfg.concurrency if cfg.mode == "closed" else cfg.max_inflight
    client = make_client(cfg.client, cfg.url, max_conn, cfg.timeout_s)
    if cfg.protocol in ("jobs", "jobs-wait"):
        fn = job_protocol(client, cfg.path, cfg.wait_s, prefer_wait=cfg.protocol == "jobs-wait")
    elif cfg.protocol == "submit":
        fn = submit_protocol(client, cfg.path)
    elif cfg.protocol == "sync":
        fn = sync_protocol(client, cfg.path)
    else:
        raise ValueError(f"unknown protocol {cfg.protocol!r}")
    tasks: set[asyncio.Task[None]] = set()
    cpu0 = _cpu_s()
    rec = Recorder(t0=time.perf_counter(), wall0=time.time())
    reporter = asyncio.create_task(_progress(cfg, rec, sys.stderr)) if progress else None
    try:
        if cfg.mode == "open":
            await _open_loop(cfg, fn, bodies, rec, tasks)
        elif cfg.mode == "closed":
            await _closed_loop(cfg, fn, bodies, rec, tasks)
        else:
            raise ValueError(f"unknown mode {cfg.mode!r}")
        if tasks:
            await asyncio.wait(set(tasks), timeout=cfg.drain_s)
        unfinished_at = time.perf_counter()
        elapsed = unfinished_at - rec.t0
        cpu = _cpu_s() - cpu0
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            if sys.stderr.isatty():
                sys.stderr.write("\n")
        await client.close()
    retries = client.retries if isinstance(client, RawClient) else 0
    return summarize(cfg, rec, elapsed, cpu, unfinished_at, retries)


def read_bodies(path: Path) -> list[bytes]:
    bodies = [line.strip().encode() for line in path.read_text().splitlines() if line.strip()]
    if not bodies:
        raise SystemExit(f"no request bodies in {path}")
    return bodies


def install_loop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--path", required=True, help="the POST path")
    p.add_argument("--bodies", type=Path, required=True, help="JSON request bodies, one a line")
    p.add_argument("--protocol", choices=("jobs", "jobs-wait", "submit", "sync"), default="jobs",
                   help="jobs: submit + long-poll; jobs-wait: submit with Prefer: wait; "
                        "submit: the POST alone; sync: one POST answered with the result")
    p.add_argument("--mode", choices=("open", "closed"), default="open")
    p.add_argument("--rate", type=float, default=100.0, help="open loop: arrivals per second")
    p.add_argument("--concurrency", type=int, default=64, help="closed loop: clients")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds left out of the figures")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to wait for stragglers")
    p.add_argument("--wait", type=float, default=30.0, help="long-poll ?wait= seconds")
    p.add_argument("--max-inflight", type=int, default=2048)
    p.add_argument("--client", choices=("raw", "httpx"), default="raw")
    p.add_argument("--timeout", type=float, default=60.0, help="per HTTP request, seconds")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, help="write the result JSON here (default: stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    cfg = Config(url=a.url.rstrip("/"), path=a.path, protocol=a.protocol, mode=a.mode,
                 rate=a.rate, concurrency=a.concurrency, duration_s=a.duration,
                 warmup_s=min(a.warmup, a.duration / 2), drain_s=a.drain, wait_s=a.wait,
                 max_inflight=a.max_inflight, client=a.client, timeout_s=a.timeout,
                 seed=a.seed, label=a.label)
    install_loop()
    result = asyncio.run(run(cfg, read_bodies(a.bodies), progress=not a.quiet))
    emit_json(result, a.out)


if __name__ == "__main__":
    main()
