"""Latency histograms that outlive the process that observes them: each worker counts into
local buckets and adds them into one Redis hash per model (`keys.job_latencies`) with each
heartbeat, so the gateway can export one cumulative Prometheus histogram per model, summed over
every worker that ever ran, whatever restarts.

Buckets fit inference: from a millisecond (a tiny model's lone job) to two minutes (a long
batch behind a queue).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from shared import keys

JOB_BUCKETS_S: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RUN, END_TO_END = "run", "e2e"  # the histograms of keys.job_latencies


@dataclass
class Buckets:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of observations."""

    bounds: tuple[float, ...] = JOB_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, cumulative count), ending with +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class LatencyRecorder:
    """A worker's unflushed observations of one model; `flush` adds them to Redis. Observed from
    any thread (the event loop's, and the compute thread's for a lone batch run there)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.pending: dict[str, Buckets] = {}
        self._lock = threading.Lock()

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            buckets = self.pending.get(name)
            if buckets is None:
                buckets = self.pending[name] = Buckets()
            buckets.observe(seconds)

    async def flush(self, redis: aioredis.Redis) -> None:
        """One round trip; on an error the counts stay pending for the next flush."""
        with self._lock:
            if not self.pending:
                return
            taken, self.pending = self.pending, {}
        pipe = redis.pipeline(transaction=False)
        key = keys.job_latencies(self.model)
        for name, b in taken.items():
            for i, n in enumerate(b.counts):
                if n:
                    pipe.hincrby(key, f"{name}:{i}", n)
            pipe.hincrbyfloat(key, f"{name}:sum", b.sum)
        try:
            await pipe.execute()
        except BaseException:
            with self._lock:
                for name, b in taken.items():
                    merged = self.pending.setdefault(name, Buckets())
                    merged.counts = [x + y for x, y in zip(merged.counts, b.counts, strict=True)]
                    merged.sum += b.sum
            raise


def read_buckets(fields: Mapping[str, str], name: str) -> Buckets | None:
    """The histogram `name` of a `keys.job_latencies` hash; None when nothing was observed."""
    counts = [int(fields.get(f"{name}:{i}", 0)) for i in range(len(JOB_BUCKETS_S) + 1)]
    if not any(counts):
        return None
    return Buckets(JOB_BUCKETS_S, counts, float(fields.get(f"{name}:sum", 0.0)))
