"""Baseline policies for the simulator and the benchmark; same protocol as `CorkPolicy`.

- `NoBatching`: one request per batch, as soon as a slot is free.
- `FixedWindow`: wait up to a fixed time from the oldest request, or until the batch is full
  (Ray Serve's `batch_wait_timeout_s`, Triton's `max_queue_delay`).
- `ReferenceCork`: BentoML's CorkDispatcher, re-implemented from its documented rules, one
  dispatcher per worker (each BentoML worker process has its own queue and at most one batch
  in flight). The workers share one listening socket and the kernel hands each connection to
  whichever process accepts it, so requests reach a worker at random (seeded); round-robin, the
  most even spread any deployment could get, is available for comparison.

The baselines are FIFO and ignore priorities. NoBatching and FixedWindow drop expired entries;
ReferenceCork, like the original, knows no expiry and keeps canceled requests (it computes them).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from batcher.policy import (
    Clock,
    Decision,
    Pending,
    PendingQueue,
    PolicyConfig,
    PolicySnapshot,
    Release,
    Shed,
    Wait,
    take_batch,
)

log = logging.getLogger(__name__)


class _Fifo:
    """Queue, in-flight set and reporting shared by NoBatching and FixedWindow."""

    def __init__(
        self, config: PolicyConfig, clock: Clock, id_factory: Callable[[], str] | None = None
    ) -> None:
        self._config = config
        self._clock = clock
        self._max_rows = max(1, config.max_batch_size)
        self._queue = PendingQueue(None)
        self._in_flight: set[str] = set()
        self._last_s = 0.0
        counter = itertools.count(1)
        self._new_id = id_factory or (lambda: f"batch-{next(counter)}")

    def add(self, item: Pending) -> None:
        self._queue.push(item)

    def remove(self, entry_ids: Iterable[str]) -> list[Pending]:
        return self._queue.remove(entry_ids)

    def on_complete(self, batch_id: str, rows: int, duration_s: float,
                    overhead_s: float | None = None) -> None:
        self._in_flight.discard(batch_id)
        self._last_s = duration_s / max(1, rows)

    def forget(self, batch_id: str) -> None:
        self._in_flight.discard(batch_id)

    def answer_leg(self, seconds: float) -> None:
        pass  # no latency promise to keep

    def predict_s(self, rows: int) -> float:
        return self._last_s * rows  # no fit: the last batch's time per row

    def batch_cost_s(self, rows: int) -> float:
        return self.predict_s(rows)

    @property
    def queue_rows(self) -> int:
        return self._queue.rows

    def snapshot(self) -> PolicySnapshot:
        queue = self._queue
        return PolicySnapshot(None, None, 0.0, len(self._in_flight), queue.rows, len(queue))

    def _expired(self) -> Shed | None:
        expired = self._queue.pop_expired(self._clock())
        return Shed(tuple(expired), "expired") if expired else None

    def _release(self, batch: list[Pending], reason: str) -> Release:
        batch_id = self._new_id()
        self._queue.remove(e.entry_id for e in batch)
        self._in_flight.add(batch_id)
        return Release(batch_id, tuple(batch), reason)


class NoBatching(_Fifo):
    """Each request alone, FIFO, whenever a slot is free."""

    def decide(self, free_slots: int, lanes: int | None = None) -> Decision:
        expired = self._expired()
        if expired is not None:
            return expired
        if free_slots <= 0 or not self._queue:
            return Wait(self._queue.next_expiry())
        return self._release(take_batch(self._queue.ordered(self._clock()), 1), "single")


class FixedWindow(_Fifo):
    """Release when `max_batch_size` rows are queued or the oldest has waited `window_ms`."""

    def __init__(
        self,
        config: PolicyConfig,
        clock: Clock,
        id_factory: Callable[[], str] | None = None,
        *,
        window_ms: float = 10.0,
    ) -> None:
        super().__init__(config, clock, id_factory)
        self._window_s = window_ms / 1000.0

    def decide(self, free_slots: int, lanes: int | None = None) -> Decision:
        expired = self._expired()
        if expired is not None:
            return expired
        if free_slots <= 0 or not self._queue:
            return Wait(self._queue.next_expiry())
        now = self._clock()
        batch = take_batch(self._queue.ordered(now), self._max_rows)
        if self._queue.rows >= self._max_rows:
            return self._release(batch, "full")
        opens_at = batch[0].arrived_s + self._window_s
        if now >= opens_at:
            return self._release(batch, "window")
        expiry = self._queue.next_expiry()
        return Wait(opens_at if expiry is None else min(opens_at, expiry))


# --- BentoML's CorkDispatcher ---------------------------------------------------------------------

TICK_S = 0.001  # the reference polls every millisecond while corked or busy
DECAY = 0.95
# (jobs required, dispatches, cork size k, refit after): the start-up training phases.
TRAINING = ((2, 8, 1, False), (6, 1, 1, True), (5, 1, 2, True), (3, 1, 3, True))


class _TokenBucket:
    """Refit limiter: the first refit is free, then one per `1 / rate_hz` seconds."""

    def __init__(self, clock: Clock, rate_hz: float = 0.2, burst: float = 1.0) -> None:
        self._clock, self._rate, self._burst = clock, rate_hz, burst
        self._amount = 2.0
        self._last = clock()

    def consume(self) -> bool:
        now = self._clock()
        self._amount = min(self._burst, self._amount + self._rate * (now - self._last))
        self._last = now
        if self._amount >= 1.0:
            self._amount -= 1.0
            return True
        return False


class _Optimizer:
    """duration = o_a·jobs + o_b by plain lstsq (minimum norm when all sizes are equal)."""

    def __init__(self, budget_s: float, clock: Clock) -> None:
        self.o_a = min(2.0, budget_s * 2 / 30)
        self.o_b = min(1.0, budget_s / 30)
        self.wait = 0.0
        self._skipped = 0
        self._samples: deque[tuple[int, float, float]] = deque(maxlen=50)
        self._bucket = _TokenBucket(clock)

    def log_outbound(self, jobs: int, wait_s: float, duration_s: float) -> None:
        if self._skipped < 2:
            self._skipped += 1
            return
        self._samples.append((jobs, wait_s, duration_s))
        if self._bucket.consume():
            self.refresh()

    def refresh(self) -> None:
        if not self._samples:
            return
        x = np.array([[n, 1.0] for n, _, _ in self._samples])
        y = np.array([d for _, _, d in self._samples])
        slope, intercept = np.linalg.lstsq(x, y, rcond=None)[0]
        self.o_a = max(1e-6, float(slope))
        self.o_b = max(0.0, float(intercept))
        self.wait = max(0.0, float(np.mean([w for _, w, _ in self._samples])))


@dataclass
class _Dispatcher:
    """One worker's CorkDispatcher: its queue, optimizer and at most one batch in flight."""

    optimizer: _Optimizer
    queue: deque[Pending] = field(default_factory=deque)
    in_flight: str | None = None
    asleep_until: float | None = None
    phase: int = 0
    done: int = 0
    target: float = 0.0


@dataclass(frozen=True)
class _Sent:
    dispatcher: _Dispatcher
    jobs: int
    wait_s: float


class ReferenceCork:
    """BentoML's CorkDispatcher rules, `workers` independent dispatchers (see module docstring).

    Faithful to the faults: the fit counts requests, not rows; the average wait decays; the shed
    estimate ignores the batch in flight and counts the whole queue; a lone request is never
    shed while its worker is idle; it polls every millisecond (a wake-up per tick while corked or
    busy; arrivals do not wake a sleeping dispatcher). One deviation, irrelevant for one-row
    requests: an entry is never split across batches (the original splits one that overflows
    `max_batch_size`)."""

    def __init__(
        self,
        config: PolicyConfig,
        clock: Clock,
        id_factory: Callable[[], str] | None = None,
        *,
        workers: int = 1,
        assign: Literal["random", "round_robin"] = "random",
        seed: int = 0,
    ) -> None:
        self._clock = clock
        self._budget_s = config.max_latency_ms / 1000.0
        self._max_rows = max(1, config.max_batch_size)
        self._dispatchers = [
            _Dispatcher(_Optimizer(self._budget_s, clock)) for _ in range(max(1, workers))
        ]
        count = len(self._dispatchers)
        rng = random.Random(seed)
        self._next_shard: Callable[[], int] = (
            (lambda: rng.randrange(count))
            if assign == "random"
            else itertools.cycle(range(count)).__next__
        )
        self._sent: dict[str, _Sent] = {}
        counter = itertools.count(1)
        self._new_id = id_factory or (lambda: f"batch-{next(counter)}")
        self._warned = False

    def add(self, item: Pending) -> None:
        self._dispatchers[self._next_shard()].queue.append(item)

    def remove(self, entry_ids: Iterable[str]) -> list[Pending]:
        return []  # the reference never drops a canceled request: it is computed anyway

    def on_complete(self, batch_id: str, rows: int, duration_s: float,
                    overhead_s: float | None = None) -> None:
        sent = self._sent.pop(batch_id, None)
        if sent is not None:
            sent.dispatcher.in_flight = None
            # The reference times its whole call (hand-off included), not the predict alone.
            total_s = duration_s + (overhead_s or 0.0)
            sent.dispatcher.optimizer.log_outbound(sent.jobs, sent.wait_s, total_s)

    def forget(self, batch_id: str) -> None:
        sent = self._sent.pop(batch_id, None)
        if sent is not None:
            sent.dispatcher.in_flight = None

    def answer_leg(self, seconds: float) -> None:
        pass  # the reference's shed estimate knows no such leg

    def predict_s(self, rows: int) -> float:
        opt = self._dispatchers[0].optimizer
        return opt.o_a * rows + opt.o_b

    def batch_cost_s(self, rows: int) -> float:
        return self.predict_s(rows)

    def decide(self, free_slots: int, lanes: int | None = None) -> Decision:
        now = self._clock()
        wake: float | None = None
        for d in self._dispatchers:
            if not d.queue:
                continue  # parked on the condition: the next add wakes it
            if d.asleep_until is not None and now < d.asleep_until:
                wake = d.asleep_until if wake is None else min(wake, d.asleep_until)
                continue
            d.asleep_until = None
            decision = self._step(d, now, free_slots)
            if decision is not None:
                return decision
            asleep = now + TICK_S
            wake = asleep if wake is None else min(wake, asleep)
        return Wait(wake)

    def _step(self, d: _Dispatcher, now: float, free_slots: int) -> Release | Shed | None:
        """One pass of the dispatcher's loop; None: it sleeps one tick."""
        n = len(d.queue)
        w0 = now - d.queue[0].arrived_s
        a, b, budget = d.optimizer.o_a, d.optimizer.o_b, self._budget_s
        corked: bool
        if d.phase < len(TRAINING):
            required, _, k, _ = TRAINING[d.phase]
            k = min(k, self._max_rows)
            if n > required - d.done and w0 >= budget:
                return Shed((d.queue.popleft(),), "overloaded")
            corked = (k > 1 and n < k and k * a + b + w0 <= d.target) or d.in_flight is not None
        else:
            if n > 1 and w0 + a * n + b >= budget:
                return Shed((d.queue.popleft(),), "overloaded")
            if d.in_flight is not None and n == 1 and w0 >= budget:
                return Shed((d.queue.popleft(),), "overloaded")
            wn = now - d.queue[-1].arrived_s
            cork = n < self._max_rows and n * (wn + TICK_S + a) <= DECAY * d.optimizer.wait
            corked = d.in_flight is not None or cork
        if corked or free_slots <= 0:
            d.asleep_until = now + TICK_S
            return None
        return self._release(d, now, training=d.phase < len(TRAINING))

    def _release(self, d: _Dispatcher, now: float, training: bool) -> Release:
        batch = take_batch(d.queue, self._max_rows)
        for _ in batch:
            d.queue.popleft()
        batch_id = self._new_id()
        d.in_flight = batch_id
        wait_s = 0.0 if training else now - batch[0].arrived_s
        self._sent[batch_id] = _Sent(d, len(batch), wait_s)
        if training:
            self._end_training_step(d)
        return Release(batch_id, tuple(batch), "training" if training else "cork")

    def _end_training_step(self, d: _Dispatcher) -> None:
        d.done += 1
        _, count, _, refit_after = TRAINING[d.phase]
        if d.done < count:
            return
        if refit_after:
            d.optimizer.refresh()
        d.phase, d.done = d.phase + 1, 0
        opt = d.optimizer
        if d.phase < len(TRAINING):
            k = min(TRAINING[d.phase][2], self._max_rows)
            target = min(0.95 * self._budget_s, (2 * k + 1) * opt.o_a + opt.o_b)
            d.target = 0.0 if k == 1 else target
        elif opt.o_a + opt.o_b >= self._budget_s and not self._warned:
            self._warned = True
            log.warning("max latency likely too low for this model (a + b >= max latency)")

    @property
    def queue_rows(self) -> int:
        return sum(e.rows for d in self._dispatchers for e in d.queue)

    def snapshot(self) -> PolicySnapshot:
        opt = self._dispatchers[0].optimizer
        return PolicySnapshot(
            a_s=opt.o_a,
            b_s=opt.o_b,
            avg_wait_ms=1000.0 * opt.wait,
            in_flight=len(self._sent),
            queue_rows=self.queue_rows,
            queue_entries=sum(len(d.queue) for d in self._dispatchers),
        )
