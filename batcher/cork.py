"""The CORK batching policy: when to release a batch, and which requests to fail under overload.

`decide` applies these rules in order:

1. Requests whose deadline has passed come back as `Shed(reason="deadline_exceeded")`, those
   whose `expires_s` (ttl) has, as `Shed(reason="expired")`.
2. With `on_overload="shed"` and a calibrated model, requests that cannot make their budget come
   back as `Shed(reason="overloaded")`, oldest first. The estimate plans the whole queue onto
   the slots in dispatch order: free slots start now, busy ones when their in-flight batch is
   predicted to end, and each planned batch takes its pessimistic duration (`predict_high`).
3. No free slot: wait for an event, or for the instant a shed or an expiry falls due.
4. Start-up probes: the first batches are capped at 1, 1 (warm-up), 1, 2, 3 rows so that the fit
   of `a*rows + b` sees different sizes. A probe of k rows waits for its k rows when the arrival
   rate says they come within half the budget of its oldest request, so light traffic
   calibrates the fit too; a trickle is never held.
5. Within a priority the queue is earliest due first (a request's deadline, else its arrival +
   `max_latency_ms`), and a batch is cut short when a full one would make its most urgent request
   miss its due time and a smaller one would not. Release at once when the queue holds
   `max_batch_size` rows, or when waiting any longer would push the batch's earliest due time
   (counting the pessimistic duration of the batch with one more arrival, and the overhead).
6. Otherwise release unless waiting for the next arrival is expected to lower latency
   (`_waiting_pays`); when it is, `Wait(until_s)` names the earliest of the latency deadline,
   the instant the expected gain runs out, and the next shed or expiry. No polling.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from batcher.latency import ArrivalRate, LatencyModel, Overhead
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

PROBE_ROWS: tuple[int, ...] = (1, 2, 3)
# A wake-up is never scheduled for the current instant: that decision has just been made.
_MIN_STEP_S = 1e-6


@dataclass
class _InFlight:
    dispatched_s: float
    rows: int
    # When its predict can have started at the earliest: its dispatch, or the end of the batch
    # it was staged behind once that one reported (estimates chained off estimates drift).
    started_s: float = -math.inf

    def __post_init__(self) -> None:
        self.started_s = max(self.started_s, self.dispatched_s)


class CorkPolicy:
    """Adaptive batching for one model; implements `batcher.policy.BatchingPolicy`."""

    def __init__(
        self,
        config: PolicyConfig,
        clock: Clock,
        id_factory: Callable[[], str] | None = None,
        *,
        refit_interval_s: float = 2.0,
        warmup_batches: int = 2,
        probe_rows: Iterable[int] = PROBE_ROWS,
        overrun_quantile: float = 1.0,
        edf: bool = True,
    ) -> None:
        self._config = config
        self._clock = clock
        self._budget_s = config.max_latency_ms / 1000.0
        self._max_rows = max(1, config.max_batch_size)
        # edf=False orders a class by arrival alone (plain FIFO CORK, for comparison).
        self._queue = PendingQueue(config.aging_ms / 1000.0, self._budget_s if edf else None)
        # Before any data: guess that a full batch takes half the budget, an eighth of it fixed.
        guess_b = self._budget_s / 8
        self._model = LatencyModel(
            clock,
            initial_a_s=(self._budget_s / 2 - guess_b) / self._max_rows,
            initial_b_s=guess_b,
            warmup=warmup_batches,
            refit_interval_s=refit_interval_s,
            overrun_quantile=overrun_quantile,
        )
        self._arrivals = ArrivalRate()
        self._overhead = Overhead()
        self._answer_leg_s = 0.0
        counter = itertools.count(1)
        self._new_id = id_factory or (lambda: f"batch-{next(counter)}")
        self._in_flight: dict[str, _InFlight] = {}
        self._probe_plan = (1,) * warmup_batches + tuple(max(1, n) for n in probe_rows)
        self._probes_released = 0
        self._calibrated = False
        self._waits_ms: deque[float] = deque(maxlen=50)
        self._warned = False
        self._counts = {"batches": 0, "rows": 0, "overloaded": 0, "expired": 0,
                        "deadline_exceeded": 0}
        self._pending_expired: list[Pending] = []  # ttl expiries behind a deadline Shed
        # (free slots, valid until): a plan that shed nothing holds until an event or that time.
        self._plan_cache: tuple[tuple[int, int | None], float] | None = None

    # --- events ------------------------------------------------------------------------------

    def add(self, item: Pending) -> None:
        """A request arrived (a duplicate entry id is ignored)."""
        if self._queue.push(item):
            self._arrivals.observe(self._clock(), item.rows)
            self._plan_cache = None

    def remove(self, entry_ids: Iterable[str]) -> list[Pending]:
        """Drop queued requests (canceled or expired); returns those that were queued."""
        self._plan_cache = None
        return self._queue.remove(entry_ids)

    def on_complete(self, batch_id: str, rows: int, duration_s: float,
                    overhead_s: float | None = None) -> None:
        """A released batch's predict took `duration_s`; `overhead_s` is the rest of its
        latency (see `BatchingPolicy.on_complete`)."""
        done = self._in_flight.pop(batch_id, None)
        if done is not None:
            self._restart_next(done)
        self._plan_cache = None
        self._model.observe(rows, duration_s)
        if overhead_s is not None and overhead_s >= 0:
            self._overhead.observe(overhead_s)
        self._calibrated = self._calibrated or self._model.identifiable
        if self._model.fitted and self._over_budget() and not self._warned:
            self._warned = True
            log.warning("%s", self._warning_text())

    def _restart_next(self, done: _InFlight) -> None:
        """The batch staged behind `done` (the earliest one dispatched before its end that
        could not have started earlier) starts now, not when it was predicted to."""
        now = self._clock()
        waiting = [f for f in self._in_flight.values()
                   if f.started_s < now and f.dispatched_s >= done.dispatched_s]
        if waiting:
            nxt = min(waiting, key=lambda f: f.dispatched_s)
            nxt.started_s = now

    def forget(self, batch_id: str) -> None:
        """A released batch will never report; stop counting it in flight."""
        self._in_flight.pop(batch_id, None)
        self._plan_cache = None

    def answer_leg(self, seconds: float) -> None:
        """The shed plan adds the answer leg, at most a quarter of the budget: a leg that long
        is a sick gateway, which shedding more would not cure."""
        leg_s = min(max(0.0, seconds), self._budget_s / 4)
        if leg_s != self._answer_leg_s:
            self._answer_leg_s = leg_s
            self._plan_cache = None

    def predict_s(self, rows: int) -> float:
        return self._model.predict(rows)

    def batch_cost_s(self, rows: int) -> float:
        return self._overhead.value_s + self._model.predict(rows)

    # --- the decision --------------------------------------------------------------------------

    def decide(self, free_slots: int, lanes: int | None = None) -> Decision:
        """One decision; the caller repeats the call while it gets Release or Shed. `lanes`:
        all the lanes of the model's serving workers, busy or not (the overload plan chains the
        batches in flight on them); None counts one per free lane and batch in flight."""
        now = self._clock()
        expired = self._queue.pop_expired(now)
        if expired:
            # Both kinds come back, each under its reason: a deadline passed, or a ttl.
            late = [e for e in expired if e.deadline_s is not None and e.deadline_s <= now]
            reason, batch = ("deadline_exceeded", late) if late else ("expired", expired)
            if late:
                self._pending_expired += [e for e in expired if e not in late]
            self._counts[reason] += len(batch)
            self._plan_cache = None
            return Shed(tuple(batch), reason)
        if self._pending_expired:
            batch, self._pending_expired = self._pending_expired, []
            self._counts["expired"] += len(batch)
            return Shed(tuple(batch), "expired")
        if not self._queue:
            return Wait(None)
        wake = self._queue.next_expiry()
        if self._config.on_overload == "shed" and self._can_shed(free_slots):
            late, next_miss = self._plan(now, free_slots, lanes)
            if late:
                self._queue.remove(e.entry_id for e in late)
                self._counts["overloaded"] += len(late)
                self._plan_cache = None
                return Shed(tuple(late), "overloaded")
            wake = _earliest(wake, next_miss)
        if free_slots <= 0:
            return self._wait(now, wake)
        probing = not self._calibrated and self._probes_released < len(self._probe_plan)
        cap = self._probe_plan[self._probes_released] if probing else self._max_rows
        batch = take_batch(self._queue.ordered(now), cap)
        if not probing:
            batch = self._meet_earliest_due(now, batch)
        rows = sum(e.rows for e in batch)
        if probing:
            # A probe of k rows waits for them when they are expected within half the budget
            # of its oldest request: light traffic then calibrates the fit with batches of 1, 2
            # and 3 rows; a trickle (or a lone client) is not held for company that won't come.
            hold_until = min(e.arrived_s for e in batch) + self._budget_s / 2
            missing_s = (cap - rows) * self._arrivals.mean_gap_s(now)
            if rows < cap and now < hold_until and now + missing_s <= hold_until:
                return self._wait(now, _earliest(wake, hold_until))
            return self._release(now, batch, "probe")
        if self._queue.rows >= self._max_rows:
            return self._release(now, batch, "full")
        due = min(self._queue.due_s(e) for e in batch)
        one_more = min(self._max_rows, rows + math.ceil(self._arrivals.rows_per_arrival))
        deadline = due - self._overhead.value_s - self._model.predict_high(one_more)
        if now >= deadline:
            return self._release(now, batch, "deadline")
        if not self._waiting_pays(now, free_slots, len(batch), rows):
            return self._release(now, batch, "no_gain")
        gain_ends = self._gain_ends(now, deadline, free_slots, len(batch), rows)
        return self._wait(now, _earliest(wake, min(deadline, gain_ends)))

    def _meet_earliest_due(self, now: float, batch: list[Pending]) -> list[Pending]:
        """Shrink the batch until its earliest due time can still be met, if any size can: a
        smaller batch ends sooner, and the most urgent jobs are at its front."""
        while len(batch) > 1:
            due = min(self._queue.due_s(e) for e in batch)
            rows = sum(e.rows for e in batch)
            room = due - now - self._overhead.value_s
            if now + self._overhead.value_s + self._model.predict_high(rows) <= due:
                break
            fit = self._model.rows_within_high(room)
            if fit >= rows or fit < batch[0].rows:
                break  # no smaller batch helps (or even the first job alone misses)
            batch = take_batch(batch, fit)
        return batch

    def _release(self, now: float, batch: list[Pending], reason: str) -> Release:
        batch_id = self._new_id()
        self._queue.remove(e.entry_id for e in batch)
        rows = sum(e.rows for e in batch)
        self._in_flight[batch_id] = _InFlight(now, rows)
        self._waits_ms.append(1000.0 * sum(now - e.arrived_s for e in batch) / len(batch))
        self._counts["batches"] += 1
        self._counts["rows"] += rows
        if reason == "probe":
            self._probes_released += 1
        self._plan_cache = None
        return Release(batch_id, tuple(batch), reason)

    def _wait(self, now: float, until: float | None) -> Wait:
        return Wait(None if until is None else max(until, now + _MIN_STEP_S))

    def _waiting_pays(self, now: float, free_slots: int, entries: int, rows: int) -> bool:
        """Compare releasing now with waiting for the next arrival and releasing both.

        Waiting costs each queued request the expected gap G, plus the next arrival's rows of
        compute, and costs the next arrival the current rows of compute. Releasing now makes
        the next arrival wait for a slot, if this is the last free one: until this batch
        (a*rows + b) or an in-flight batch ends, whichever is sooner; for Poisson arrivals the
        expected wait for a slot free after s is s - G*(1 - exp(-s/G)). With two free slots the
        next arrival finds one, and at light load G is long, so a lone request goes at once.
        """
        if free_slots >= 2:
            return False
        gap = self._arrivals.mean_gap_s(now)
        if math.isinf(gap):
            return False
        a, b = self._model.a_s, self._model.b_s
        slot_wait = a * rows + b
        for f in self._in_flight.values():
            slot_wait = min(slot_wait, max(0.0, f.dispatched_s + self._model.predict(f.rows) - now))
        saved = slot_wait + gap * math.expm1(-slot_wait / gap) if gap > 0 else slot_wait
        cost = entries * (gap + a * self._arrivals.rows_per_arrival) + a * rows
        return cost < saved

    def _gain_ends(self, now: float, deadline: float, free: int, entries: int, rows: int) -> float:
        """When waiting stops paying if nothing happens first (at most `deadline`).

        With no event the gain only shrinks (the gap in progress stretches the expected gap and
        in-flight batches near their end), so bisection finds the crossing to 10 us."""
        if self._waiting_pays(deadline, free, entries, rows):
            return deadline
        low, high = now, deadline
        while high - low > 1e-5:
            mid = (low + high) / 2
            if self._waiting_pays(mid, free, entries, rows):
                low = mid
            else:
                high = mid
        return high

    # --- overload -------------------------------------------------------------------------------

    def _can_shed(self, free_slots: int) -> bool:
        # An uncalibrated line could fail requests that would make it; with no slot at all
        # (scaled to zero) there is nothing to plan onto.
        return self._calibrated and max(0, free_slots) + len(self._in_flight) > 0

    def _plan(self, now: float, free_slots: int,
              lanes: int | None) -> tuple[list[Pending], float | None]:
        """Requests that cannot make their budget, and when the next one will stop making it.

        The batches in flight are chained onto the lanes in dispatch order (a batch staged
        behind another on the same lane starts when that one ends), which gives each lane's
        free time. Each lane then carries (free time, base), base being where its chain of
        planned batches starts; a planned batch ending at C misses a deadline D once the clock
        passes D - (C - base), since until then nothing in the chain moves."""
        cache = self._plan_cache
        key = (free_slots, lanes)
        if cache is not None and cache[0] == key and now < cache[1]:
            return [], None if math.isinf(cache[1]) else cache[1]
        order = list(self._queue.ordered(now))
        count = lanes if lanes is not None else max(0, free_slots) + len(self._in_flight)
        free_at = [-math.inf] * max(0, count)
        for f in sorted(self._in_flight.values(), key=lambda f: f.dispatched_s):
            if not free_at:
                break
            start = max(heapq.heappop(free_at), f.started_s)
            heapq.heappush(free_at, start + self._model.predict_high(f.rows))
        slots = [(max(now, t), max(now, t)) for t in free_at]
        heapq.heapify(slots)
        late: list[Pending] = []
        next_miss = math.inf
        # The promise is about served jobs' p99: a batch counts as late if it would be with
        # a high overhead, not a typical one, and the answer's last leg on top (under overload
        # nearly every served job is planned just inside its budget). Never more than half the
        # budget: past that the estimate is a stall, and a plan that sheds everything completes
        # no batch that could correct it.
        overhead = min(self._overhead.high_s + self._answer_leg_s, self._budget_s / 2)
        while order:
            start, base = heapq.heappop(slots)
            batch = take_batch(order, self._max_rows)
            # The batch holds its lane for its predict; its jobs see the overhead on top.
            lane_free = start + self._model.predict_high(sum(e.rows for e in batch))
            done = lane_free + overhead
            missed = {e.entry_id for e in batch if done > self._queue.due_s(e)}
            if missed:
                # Dropping the misses lets later requests move up into this batch: replan it.
                late.extend(e for e in batch if e.entry_id in missed)
                order = [e for e in order if e.entry_id not in missed]
                heapq.heappush(slots, (start, base))
                continue
            for e in batch:
                next_miss = min(next_miss, self._queue.due_s(e) - (done - base))
            order = order[len(batch) :]
            heapq.heappush(slots, (lane_free, base))
        if not late:
            self._plan_cache = (key, next_miss)
        return late, None if math.isinf(next_miss) else next_miss

    # --- reporting ------------------------------------------------------------------------------

    def _over_budget(self) -> bool:
        return self._model.a_s + self._model.b_s + self._overhead.value_s >= self._budget_s

    def _warning_text(self) -> str:
        return (
            f"a one-row batch takes {1000 * (self._model.a_s + self._model.b_s):.1f} ms "
            f"(a={1000 * self._model.a_s:.2f} ms/row, b={1000 * self._model.b_s:.2f} ms), "
            f"at or above max_latency_ms={self._config.max_latency_ms:g}: requests will miss it"
        )

    @property
    def queue_rows(self) -> int:
        """Rows waiting in the policy."""
        return self._queue.rows

    def snapshot(self) -> PolicySnapshot:
        """Fitted a, b (None before any data), mean queue wait of the last 50 batches, counts."""
        fitted = self._model.fitted
        batches = self._counts["batches"]
        return PolicySnapshot(
            a_s=self._model.a_s if fitted else None,
            b_s=self._model.b_s if fitted else None,
            avg_wait_ms=sum(self._waits_ms) / len(self._waits_ms) if self._waits_ms else 0.0,
            in_flight=len(self._in_flight),
            queue_rows=self._queue.rows,
            queue_entries=len(self._queue),
            warning=self._warning_text() if fitted and self._over_budget() else None,
            fitted_batches=self._model.samples,
            extra={
                "arrival_rate_hz": self._arrivals.rate_hz(self._clock()),
                "calibrated": float(self._calibrated),
                "identifiable": float(self._model.identifiable),
                "overrun": self._model.overrun,
                "overhead_s": self._overhead.value_s,
                "batches": float(batches),
                "mean_batch_rows": self._counts["rows"] / batches if batches else 0.0,
                "shed_overloaded": float(self._counts["overloaded"]),
                "shed_expired": float(self._counts["expired"]),
            },
        )


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
