"""A small open-loop load generator for `asyncinfer bench`.

Open loop: request i is sent at `start + i / rate` whatever happened to the earlier ones, so a
slow system cannot slow the offered load down (a closed loop would, and hide the queueing), and
latency is measured from the scheduled send time, so a late send counts against the system
(no coordinated omission). Each job is followed to its final state with `AsyncClient.run`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import httpx

from asyncinfer.benchview import BenchProgress, Sample
from asyncinfer.client import ApiError, AsyncClient

PROGRESS_EVERY_S = 0.5
RECENT_S = 5.0  # live throughput and latency are over this last stretch
MAX_CONNECTIONS = 1000  # the offered load needs rate × latency connections at once


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Bench:
    """One run: `await Bench(...).run()` returns the summary; `progress` gets snapshots
    (`asyncinfer.benchview` draws them); `samples` has every job once it is over."""

    def __init__(self, url: str | None, model: str, input: Any, *, rate: float,
                 duration_s: float, timeout_s: float = 60.0,
                 progress: Callable[[BenchProgress], None] | None = None) -> None:
        self.url, self.model, self.input = url, model, input
        self.rate, self.duration_s, self.timeout_s = rate, duration_s, timeout_s
        self.progress = progress
        self.outcomes: Counter[str] = Counter()
        self.latencies_ms: list[float] = []
        self.samples: list[Sample] = []
        self.recent: deque[tuple[float, float]] = deque()  # (finished, latency ms) of ok jobs
        self.sent = 0
        self.started = 0.0

    async def _one(self, client: AsyncClient, scheduled: float) -> None:
        outcome: str
        try:
            job = await client.run(self.model, self.input, timeout_s=self.timeout_s)
            outcome = job.status
        except ApiError as exc:  # 429 when the backlog is full: the system said no
            outcome = "rejected" if exc.status == 429 else exc.type
        self.outcomes[outcome] += 1
        now = time.monotonic()
        latency_ms = (now - scheduled) * 1000 if outcome == "succeeded" else None
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)
            self.recent.append((now, latency_ms))
        self.samples.append(Sample(scheduled - self.started, latency_ms, outcome))

    def _report(self, started: float) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        while self.recent and now - self.recent[0][0] > RECENT_S:
            self.recent.popleft()
        window = min(RECENT_S, max(now - started, 1e-3))
        lat = sorted(v for _, v in self.recent)
        done = sum(self.outcomes.values())
        ok, rejected = self.outcomes["succeeded"], self.outcomes["rejected"]
        self.progress(BenchProgress(
            elapsed_s=now - started, duration_s=self.duration_s, sent=self.sent, done=done,
            ok=ok, rejected=rejected, failed=done - ok - rejected,
            throughput_per_s=len(lat) / window, p50_ms=percentile(lat, 50),
            p99_ms=percentile(lat, 99)))

    async def run(self) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS,
                              max_keepalive_connections=MAX_CONNECTIONS)
        # No client-side retries: a rejection is a result of the run, not something to hide.
        async with httpx.AsyncClient(limits=limits) as http, \
                AsyncClient(self.url, max_retries=0, http=http) as client:
            started = self.started = time.monotonic()
            total = max(1, int(self.rate * self.duration_s))
            tasks: list[asyncio.Task[None]] = []
            next_report = started
            for i in range(total):
                scheduled = started + i / self.rate
                await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
                tasks.append(asyncio.create_task(self._one(client, scheduled)))
                self.sent += 1
                if time.monotonic() >= next_report:
                    self._report(started)
                    next_report += PROGRESS_EVERY_S
            pending = set(tasks)
            while pending:  # keep reporting while the tail drains
                _, pending = await asyncio.wait(pending, timeout=PROGRESS_EVERY_S)
                self._report(started)
            elapsed = time.monotonic() - started
        lat = sorted(self.latencies_ms)
        return {
            "model": self.model, "offered_rate": self.rate, "duration_s": round(elapsed, 3),
            "sent": self.sent, "outcomes": dict(self.outcomes),
            "throughput_per_s": round(self.outcomes["succeeded"] / elapsed, 2),
            "latency_ms": {name: None if v is None else round(v, 1) for name, v in (
                ("p50", percentile(lat, 50)), ("p90", percentile(lat, 90)),
                ("p99", percentile(lat, 99)), ("max", lat[-1] if lat else None))},
        }
