"""Running statistics the batcher publishes in its state (and the gateway turns into metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
