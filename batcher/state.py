"""What the batcher publishes about one model: its running statistics and the state snapshot
(`keys.batcher_state`) that `GET /v1/models/{model}` shows and the gateway turns into metrics."""

from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field

from batcher.policy import PolicySnapshot

QUEUE_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class WaitHistogram:
    """Submit-to-dispatch waits, cumulative like a Prometheus histogram (rendered by the
    gateway's /metrics from the published state)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(QUEUE_WAIT_BUCKETS_S) + 1))
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.total_s += seconds
        i = next((i for i, b in enumerate(QUEUE_WAIT_BUCKETS_S) if seconds <= b),
                 len(QUEUE_WAIT_BUCKETS_S))
        self.counts[i] += 1

    def as_dict(self) -> dict[str, object]:
        return {"buckets_s": list(QUEUE_WAIT_BUCKETS_S), "counts": self.counts,
                "sum_s": self.total_s}


@dataclass
class BatcherStats:
    """Counters of one model's batcher, published in its state every refresh."""

    reasons: Counter[str] = field(default_factory=Counter)
    shed: Counter[str] = field(default_factory=Counter)  # jobs the policy ended, by reason
    batch_rows: Counter[int] = field(default_factory=Counter)
    handoffs_ms: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    queue_wait: WaitHistogram = field(default_factory=WaitHistogram)
    completed: deque[tuple[float, int]] = field(default_factory=deque)
    deaths: int = 0
    requeued: int = 0
    suspects_run: int = 0

    def dispatched(self, reason: str, rows: int, waits_s: list[float]) -> None:
        self.reasons[reason] += 1
        self.batch_rows[rows] += 1
        for w in waits_s:
            self.queue_wait.observe(w)

    def shed_jobs(self, reason: str, jobs: int) -> None:
        self.shed[reason] += jobs

    def done(self, now: float, rows: int, handoff_ms: float | None) -> None:
        self.completed.append((now, rows))
        if handoff_ms is not None:
            self.handoffs_ms.append(handoff_ms)

    def drain_rows_per_s(self, now: float, window_s: float = 30.0) -> float:
        while self.completed and now - self.completed[0][0] > window_s:
            self.completed.popleft()
        if not self.completed:
            return 0.0
        span = min(window_s, max(1.0, now - self.completed[0][0]))
        return sum(n for _, n in self.completed) / span

    def as_dict(self, now: float) -> dict[str, object]:
        return {
            "dispatch_reasons": dict(self.reasons), "shed_jobs": dict(self.shed),
            "batch_rows": dict(self.batch_rows),
            "queue_wait": self.queue_wait.as_dict(),
            "drain_rows_per_s": self.drain_rows_per_s(now),
            # Median over the last batches of the hand-off (dispatch to the task's start).
            "handoff_ms_p50": statistics.median(self.handoffs_ms) if self.handoffs_ms else None,
            "worker_deaths": self.deaths, "requeued": self.requeued,
            "suspect_batches": self.suspects_run,
        }


def published_state(*, snap: PolicySnapshot, stats: BatcherStats, now: float, batcher: str,
                    in_flight: int, held: int, suspects: int, lanes: int, free_lanes: int,
                    workers: int, lead_s: float, lane_free_in_s: float = 0.0,
                    answer_leg_s: float = 0.0) -> dict[str, object]:
    """The JSON snapshot of a model's batcher."""
    return {
        "a_s": snap.a_s, "b_s": snap.b_s, "overhead_s": snap.extra.get("overhead_s"),
        "avg_wait_ms": snap.avg_wait_ms, "in_flight": in_flight,
        "queue_rows": snap.queue_rows, "held": held, "suspects": suspects, "lanes": lanes,
        "slots": lanes, "free_lanes": free_lanes, "lead_ms": 1000 * lead_s,
        "answer_leg_ms": 1000 * answer_leg_s,
        # For the gateway's ETAs: until a busy lane is expected free (0 with a free lane).
        "lane_free_in_ms": 1000 * lane_free_in_s,
        "workers": workers, "warning": snap.warning, "batcher": batcher,
        "policy": snap.extra, **stats.as_dict(now),
    }
