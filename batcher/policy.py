"""The contract between the batcher's I/O loop (and the simulator) and a batching policy.

A policy is a pure decision core: it holds the queued requests it was given, the batches it
released that have not completed, and whatever it learned from completions. It never does I/O and
reads time only through the injected monotonic clock, so the live batcher and the simulator drive
exactly the same code.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
OnOverload = Literal["queue", "shed"]
Clock = Callable[[], float]


@dataclass(frozen=True)
class Pending:
    """One queued request as a policy sees it. Times are on the policy's monotonic clock."""

    entry_id: str
    job_id: str
    rows: int = 1
    priority: Priority = "normal"
    arrived_s: float = 0.0
    # Absolute time after which the job is useless (its ttl); None for no limit.
    expires_s: float | None = None
    # Absolute time by which the job must have finished (its `deadline_ms`); None: the model's
    # `max_latency_ms` after arrival is its due time, and nothing expires it early.
    deadline_s: float | None = None

    def due_s(self, budget_s: float) -> float:
        """When the job should be finished: its deadline, else arrival + the model's budget."""
        return self.deadline_s if self.deadline_s is not None else self.arrived_s + budget_s

    @property
    def drop_s(self) -> float | None:
        """When the job becomes useless if it has not started: its ttl or its deadline."""
        if self.deadline_s is None:
            return self.expires_s
        return self.deadline_s if self.expires_s is None else min(self.expires_s,
                                                                  self.deadline_s)


@dataclass(frozen=True)
class PolicyConfig:
    """Serving options of one model that concern batching."""

    max_batch_size: int = 32
    max_latency_ms: float = 100.0
    on_overload: OnOverload = "queue"
    # How long a lower priority request waits before it counts as one level higher.
    aging_ms: float = 1000.0


@dataclass(frozen=True)
class Release:
    """Dispatch these entries now as one batch."""

    batch_id: str
    entries: tuple[Pending, ...]
    reason: str

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)


@dataclass(frozen=True)
class Wait:
    """Nothing to do before `until_s` (absolute, policy clock) or the next event.

    `until_s` None means: only an event can change the decision."""

    until_s: float | None


@dataclass(frozen=True)
class Shed:
    """Fail these entries now (they cannot make their latency budget)."""

    entries: tuple[Pending, ...]
    reason: str


Decision = Release | Wait | Shed


@dataclass(frozen=True)
class PolicySnapshot:
    """Live values shown in `GET /v1/models/{model}` and exported as metrics."""

    a_s: float | None
    b_s: float | None
    avg_wait_ms: float
    in_flight: int
    queue_rows: int
    queue_entries: int
    warning: str | None = None
    fitted_batches: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class BatchingPolicy(Protocol):
    """What the batcher loop and the simulator call. Implementations must be deterministic given
    the clock and the call sequence.

    A slot is a lane: one predict that can run now (see `batcher.capacity`); `decide` is given
    how many lanes can take a batch now."""

    def add(self, item: Pending) -> None:
        """A request arrived."""

    def remove(self, entry_ids: Iterable[str]) -> list[Pending]:
        """Drop queued requests (canceled or expired); returns those that were queued."""

    def decide(self, free_slots: int, lanes: int | None = None) -> Decision:
        """What to do now (`lanes`: every lane of the serving workers, busy or not). Called
        after every event and when a Wait's deadline passes; the caller keeps calling while it
        gets Release or Shed, so one call returns one batch."""

    def on_complete(self, batch_id: str, rows: int, duration_s: float,
                    overhead_s: float | None = None) -> None:
        """A released batch's predict is over. `duration_s` is its predict span as the worker
        measured it (the lane it held); `overhead_s` the rest of its latency as a job sees it
        (hand-off, fetch, preprocess, postprocess, final write), which other batches overlap."""

    def forget(self, batch_id: str) -> None:
        """A released batch will never report (its worker died); stop counting it in flight."""

    def answer_leg(self, seconds: float) -> None:
        """The leg after a job's final write that only the gateways see (`shared.answerleg`),
        as they last measured it: a promise about the client's time (shed mode) adds it."""

    def predict_s(self, rows: int) -> float:
        """Expected predict span of a batch of `rows` rows: how long it holds a lane."""

    def batch_cost_s(self, rows: int) -> float:
        """Expected latency a batch of `rows` rows adds to its jobs once released."""

    def snapshot(self) -> PolicySnapshot:
        """The live values."""

    @property
    def queue_rows(self) -> int:
        """Rows waiting in the policy."""


# --- Helpers shared by the policies (additive; the contract above is unchanged). ---------------

_LEVEL: dict[Priority, int] = {"high": 0, "normal": 1, "low": 2}


def level_of(priority: Priority) -> int:
    """0 for high, 1 for normal, 2 for low."""
    return _LEVEL[priority]


class PendingQueue:
    """Queued requests in dispatch order: by (aged) priority, then earliest due first (a job's
    deadline, else its arrival + `budget_s`), then by insertion.

    With `aging_s` set, a request gains one priority level per `aging_s` spent queued, so after
    two aging periods a low request competes as high and nothing starves. With `aging_s=None`
    priorities are ignored; with `budget_s=None` deadlines are: by arrival, FIFO (the baselines,
    and the FIFO variant of CORK). Without explicit deadlines EDF is FIFO within a class.

    Removal is lazy: removed or taken entries stay in their deque until they reach its head. An
    entry id removed and queued again is a new entry; its stale copy is recognised by identity.
    """

    def __init__(self, aging_s: float | None, budget_s: float | None = None) -> None:
        self._aging_s = aging_s
        self._budget_s = budget_s
        self._lanes: tuple[deque[Pending], ...] = (deque(), deque(), deque())
        self._live: dict[str, Pending] = {}
        self._expiries: list[tuple[float, str]] = []
        self._rows = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._live

    @property
    def rows(self) -> int:
        return self._rows

    def push(self, item: Pending) -> bool:
        """Queue `item`; False (and nothing changes) if its entry id is already queued."""
        if item.entry_id in self._live:
            return False
        lane = self._lanes[level_of(item.priority) if self._aging_s is not None else 0]
        # Keep each lane sorted by due time (redelivered entries carry an older arrival, tight
        # deadlines overtake loose ones) so that the head of a lane is its most urgent entry.
        due = self.due_s(item)
        pos = len(lane)
        while pos > 0 and self.due_s(lane[pos - 1]) > due:
            pos -= 1
        lane.insert(pos, item)
        self._live[item.entry_id] = item
        self._rows += item.rows
        if item.drop_s is not None:
            heapq.heappush(self._expiries, (item.drop_s, item.entry_id))
        return True

    def due_s(self, item: Pending) -> float:
        """The ordering key within a priority class."""
        return item.arrived_s if self._budget_s is None else item.due_s(self._budget_s)

    def remove(self, entry_ids: Iterable[str]) -> list[Pending]:
        """Forget the given entries; returns those that were queued."""
        removed: list[Pending] = []
        for entry_id in entry_ids:
            item = self._live.pop(entry_id, None)
            if item is not None:
                self._rows -= item.rows
                removed.append(item)
        return removed

    def effective_level(self, item: Pending, now: float) -> int:
        if self._aging_s is None or self._aging_s <= 0:
            return 0
        base = level_of(item.priority)
        boost = int(max(0.0, now - item.arrived_s) // self._aging_s)
        return max(0, base - boost)

    def ordered(self, now: float) -> Iterator[Pending]:
        """Live entries in dispatch order at time `now` (a lazy merge of the priority lanes)."""
        for lane in self._lanes:
            while lane and not self._is_live(lane[0]):
                lane.popleft()
        cursors = [0, 0, 0]
        while True:
            best: tuple[int, float, int] | None = None
            for i, lane in enumerate(self._lanes):
                while cursors[i] < len(lane) and not self._is_live(lane[cursors[i]]):
                    cursors[i] += 1
                if cursors[i] < len(lane):
                    head = lane[cursors[i]]
                    key = (self.effective_level(head, now), self.due_s(head), i)
                    if best is None or key < best:
                        best = key
            if best is None:
                return
            lane_index = best[2]
            yield self._lanes[lane_index][cursors[lane_index]]
            cursors[lane_index] += 1

    def pop_expired(self, now: float) -> list[Pending]:
        """Remove and return the entries whose ttl or deadline (`drop_s`) is at or before
        `now`."""
        expired: list[Pending] = []
        while self._expiries and self._expiries[0][0] <= now:
            drop_s, entry_id = heapq.heappop(self._expiries)
            item = self._live.get(entry_id)
            if item is not None and item.drop_s == drop_s:
                expired.extend(self.remove([entry_id]))
        return expired

    def next_expiry(self) -> float | None:
        """The earliest `drop_s` among queued entries, if any."""
        while self._expiries:
            drop_s, entry_id = self._expiries[0]
            item = self._live.get(entry_id)
            if item is not None and item.drop_s == drop_s:
                return drop_s
            heapq.heappop(self._expiries)
        return None

    def _is_live(self, item: Pending) -> bool:
        return self._live.get(item.entry_id) is item


def take_batch(ordered: Iterable[Pending], max_rows: int) -> list[Pending]:
    """The next batch: entries in order while they fit in `max_rows`; an entry larger than
    `max_rows` at the head goes alone (it cannot be split here). Stops at the first entry that
    does not fit, so no later entry overtakes it."""
    batch: list[Pending] = []
    rows = 0
    for item in ordered:
        if batch and rows + item.rows > max_rows:
            break
        batch.append(item)
        rows += item.rows
        if rows >= max_rows:
            break
    return batch
