"""When will a queued job start and finish: a pure estimate from the batcher's published state.

The gateway uses it twice: the `eta` of every read of a queued job, and the admission of a job
with `deadline_ms` (answered 429 `deadline_unmeetable` when it cannot make it). Inputs: the job's
position (queued rows ahead of it in the batcher's order: higher priorities, then earlier due
times in its own), and what the batcher published about the model: the fitted predict time
`a·rows + b`, the fixed overhead around a predict, the lanes (free now, and when the next busy
one frees). The queue ahead drains in full batches, lanes in parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Drain:
    """How fast a model's queue drains, from its batcher's state."""

    a_s: float
    b_s: float
    overhead_s: float
    lanes: int
    free_lanes: int
    lane_free_in_s: float  # until the next busy lane frees (0 with a free lane)
    max_batch_size: int

    @classmethod
    def from_state(cls, state: dict[str, Any], max_batch_size: int) -> Drain | None:
        """None when the batcher has not fitted the model or no worker serves it: then
        nothing can be predicted (a cold start is not)."""
        a, b, lanes = state.get("a_s"), state.get("b_s"), int(state.get("lanes") or 0)
        if a is None or b is None or lanes <= 0:
            return None
        return cls(float(a), float(b), float(state.get("overhead_s") or 0.0), lanes,
                   int(state.get("free_lanes") or 0),
                   float(state.get("lane_free_in_ms") or 0.0) / 1000, max(1, max_batch_size))

    @property
    def full_batch_s(self) -> float:
        return self.a_s * self.max_batch_size + self.b_s


@dataclass(frozen=True)
class Eta:
    """Seconds from now; `position` is the rows queued ahead of the job."""

    position: int
    start_in_s: float
    finish_in_s: float


def estimate(drain: Drain, ahead_rows: int, rows: int = 1) -> Eta:
    """The job's start and finish, with `ahead_rows` rows queued before it."""
    size = drain.max_batch_size
    batch = ahead_rows // size  # the job rides in the batch-th batch from now (0-based)
    if batch < drain.free_lanes:
        start = 0.0
    else:
        rounds = (batch - drain.free_lanes) // drain.lanes
        start = drain.lane_free_in_s + rounds * drain.full_batch_s
    # Its own batch: full when there are batches before it, else what is ahead plus itself.
    batch_rows = size if batch > 0 else min(size, ahead_rows + max(1, rows))
    finish = start + drain.overhead_s + drain.a_s * batch_rows + drain.b_s
    return Eta(ahead_rows, start, finish)


def retry_after_s(eta: Eta, deadline_s: float) -> int:
    """A Retry-After for a deadline that cannot be met now: when the queue ahead will have
    drained by what the job would have missed by."""
    return max(1, math.ceil(eta.finish_in_s - deadline_s))


def max_ahead(drain: Drain, deadline_s: float, rows: int = 1) -> int:
    """The most rows that may be queued ahead of a job that must finish within `deadline_s`;
    -1 when it cannot even alone."""
    if estimate(drain, 0, rows).finish_in_s > deadline_s:
        return -1
    low, high = 0, 1
    while estimate(drain, high, rows).finish_in_s <= deadline_s:
        low, high = high, high * 2
        if high > 1 << 30:
            return high
    while high - low > 1:  # estimate grows with the rows ahead: bisect the last that fits
        mid = (low + high) // 2
        if estimate(drain, mid, rows).finish_in_s <= deadline_s:
            low = mid
        else:
            high = mid
    return low
