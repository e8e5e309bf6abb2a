"""Which workers can take a batch now: the batcher's one meaning of capacity. Pure (no I/O).

A worker has `lanes` predicts that can run at once (its model's `predict_concurrency`). A batch
holds a lane for its predict; what comes before the predict (hand-off, fetch, preprocess: the
`lead_s`, measured by the batcher) and after it (postprocess, final write) runs beside other
batches. A dispatched batch's predict is expected to start `lead_s` after its dispatch, or when
the lane's previous predict is expected to end if that is later, and to last the policy's
prediction. A lane is offered for the next batch `lead_s` before its predict is expected to end,
even if the worker has not reported it free yet: the next batch's lead then overlaps the end of
the predict before it, and the model is not left idle between batches. At most one batch per
lane waits inside a worker like this (`STAGED`), so a predict that runs long never stacks more
batches where they could no longer grow. With no lead measured yet, a lane frees only on its
report.

A batch stops being outstanding when its worker reports its predict done (or failed, or timed
out); a worker that vanishes from the live set takes its outstanding batches with it (the caller
turns them into suspects, see `batcher.recovery`). A report can be lost (a Redis outage): every
heartbeat lists the batches the worker holds before their predict ends, so a batch missing from
`LOST_AFTER_BEATS` new heartbeats in a row is over too.

A worker running suspects (`isolate`) gets nothing else until that batch is over: if a suspect
kills its worker, it takes no healthy batch down with it, and every death it causes is its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

STAGED = 1  # batches per lane a worker may hold waiting for it
LOST_AFTER_BEATS = 3  # heartbeats in a row that do not list an outstanding batch: it is over


@dataclass(frozen=True)
class WorkerInfo:
    """What a heartbeat says about a live worker."""

    worker_id: str
    lanes: int
    serving: bool  # ready or busy; starting and draining workers take no new batch
    batches: tuple[str, ...] = ()  # batches it holds that have not reached their lane's end
    beat: int = 0  # the heartbeat's sequence number


@dataclass
class Outstanding:
    """A batch dispatched to a worker whose predict has not been reported done."""

    batch_id: str
    dispatched_s: float
    busy_until_s: float | None  # None: unknown (a batch of an earlier leader), busy until reported
    misses: int = 0  # heartbeats since its dispatch that did not list it
    predict_s: float = 0.0  # how long its predict is expected to take


@dataclass
class _Worker:
    lanes: int
    serving: bool
    outstanding: dict[str, Outstanding] = field(default_factory=dict)
    last_dispatch_s: float = float("-inf")
    beat: int = -1
    isolated: str | None = None  # the suspect batch it runs alone

    def busy(self, now: float, lead_s: float) -> int:
        if lead_s <= 0:
            return len(self.outstanding)
        return sum(1 for o in self.outstanding.values()
                   if o.busy_until_s is None or o.busy_until_s - lead_s > now)

    def free(self, now: float, lead_s: float) -> int:
        if not self.serving or self.isolated is not None:
            return 0
        return max(0, min(self.lanes - self.busy(now, lead_s),
                          self.lanes * (1 + STAGED) - len(self.outstanding)))

    def idle(self) -> int:
        return max(0, self.lanes - len(self.outstanding))

    def missed(self, listed: tuple[str, ...]) -> list[Outstanding]:
        """A new heartbeat: count it against every outstanding batch it does not list; returns
        (and forgets) those missed too often."""
        lost = []
        for o in list(self.outstanding.values()):
            o.misses = 0 if o.batch_id in listed else o.misses + 1
            if o.misses >= LOST_AFTER_BEATS:
                del self.outstanding[o.batch_id]
                if self.isolated == o.batch_id:
                    self.isolated = None
                lost.append(o)
        return lost


@dataclass
class Synced:
    """What a `Capacity.sync` found."""

    gone: dict[str, list[Outstanding]] = field(default_factory=dict)
    lost: list[tuple[str, Outstanding]] = field(default_factory=list)


class Capacity:
    """Live workers of one model and the batches each holds."""

    def __init__(self, lead_s: float = 0.0) -> None:
        self._workers: dict[str, _Worker] = {}
        self.lead_s = lead_s  # dispatch to predict start; the batcher keeps it measured

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def lanes(self) -> int:
        """Lanes of the workers that take batches now."""
        return sum(w.lanes for w in self._workers.values() if w.serving)

    @property
    def outstanding(self) -> int:
        return sum(len(w.outstanding) for w in self._workers.values())

    def sync(self, live: Iterable[WorkerInfo], now: float, *,
             keep_missing: bool = False) -> Synced:
        """Update from the live workers. Returns the workers that are gone, with the batches they
        held, and the batches whose report was lost. A worker seen for the first time brings the
        batches its heartbeat names (dispatched by an earlier leader): they hold a lane until
        reported. `keep_missing`: nobody is declared gone (Redis just came back, and the workers'
        liveness keys with it are not all back yet)."""
        synced = Synced()
        seen: set[str] = set()
        for info in live:
            seen.add(info.worker_id)
            w = self._workers.get(info.worker_id)
            if w is None:
                w = self._workers[info.worker_id] = _Worker(max(1, info.lanes), info.serving)
                for batch_id in info.batches:
                    w.outstanding[batch_id] = Outstanding(batch_id, now, None)
            w.lanes, w.serving = max(1, info.lanes), info.serving
            if info.beat > w.beat >= 0:
                synced.lost += [(info.worker_id, o) for o in w.missed(info.batches)]
            w.beat = max(w.beat, info.beat)
        if keep_missing:
            return synced
        synced.gone = {wid: list(w.outstanding.values())
                       for wid, w in self._workers.items() if wid not in seen}
        for wid in synced.gone:
            del self._workers[wid]
        return synced

    def free_lanes(self, now: float) -> int:
        """Batches that may be dispatched now."""
        return sum(w.free(now, self.lead_s) for w in self._workers.values())

    def next_change_s(self, now: float) -> float | None:
        """The next instant a lane is offered without any event (`lead_s` before a predict's
        expected end)."""
        if self.lead_s <= 0:
            return None
        times = [o.busy_until_s - self.lead_s for w in self._workers.values() if w.serving
                 and len(w.outstanding) < w.lanes * (1 + STAGED)
                 for o in w.outstanding.values()
                 if o.busy_until_s is not None and o.busy_until_s - self.lead_s > now]
        return min(times) if times else None

    def free_in_s(self, now: float) -> float:
        """Until a lane of a serving worker is expected free: 0 if one is free now."""
        if self.free_lanes(now) > 0:
            return 0.0
        ends = [o.busy_until_s - now for w in self._workers.values() if w.serving
                for o in w.outstanding.values() if o.busy_until_s is not None]
        return max(0.0, min(ends)) if ends else 0.0

    def pick(self, now: float, *, alone: bool = False) -> str | None:
        """The worker for the next batch: most idle lanes first (spread the load; an idle lane
        starts at once), then the one that got a batch least recently. `alone`: only a worker
        that holds nothing (for suspects)."""
        best: tuple[int, float, str] | None = None
        for wid, w in self._workers.items():
            if w.free(now, self.lead_s) <= 0 or (alone and w.outstanding):
                continue
            key = (-w.idle(), w.last_dispatch_s, wid)
            if best is None or key < best:
                best = key
        return None if best is None else best[2]

    def dispatched(self, worker_id: str, batch_id: str, now: float, predict_s: float) -> None:
        """A batch went to `worker_id`; its predict should start after the lead, or when the
        lane it waits for is expected free, and hold that lane for `predict_s`."""
        w = self._workers.get(worker_id)
        if w is None:  # it died while the batch was on its way: its death sorts the batch out
            return
        ready = now + self.lead_s
        ends = sorted(o.busy_until_s for o in w.outstanding.values()
                       if o.busy_until_s is not None and o.busy_until_s > ready)
        start = ready if len(ends) < w.lanes else ends[len(ends) - w.lanes]
        w.outstanding[batch_id] = Outstanding(batch_id, now, start + predict_s,
                                              predict_s=predict_s)
        w.last_dispatch_s = now

    def isolate(self, worker_id: str, batch_id: str) -> None:
        """The worker runs suspects: nothing else goes to it until `batch_id` is over."""
        w = self._workers.get(worker_id)
        if w is not None:
            w.isolated = batch_id

    def reported(self, worker_id: str, batch_id: str,
                 now: float | None = None) -> Outstanding | None:
        """The worker reported the batch's predict over (at `now`); returns what was
        outstanding. A batch staged behind it starts now: its expected end moves with the real
        one (else estimates chained off estimates drift, and lanes are offered too early)."""
        w = self._workers.get(worker_id)
        if w is None:
            return None
        if w.isolated == batch_id:
            w.isolated = None
        done = w.outstanding.pop(batch_id, None)
        if done is not None and now is not None:
            waiting = [o for o in w.outstanding.values() if o.busy_until_s is not None
                       and o.dispatched_s >= done.dispatched_s
                       and o.busy_until_s - o.predict_s < now]
            if waiting:
                nxt = min(waiting, key=lambda o: o.dispatched_s)
                nxt.busy_until_s = now + nxt.predict_s
        return done

    def holder(self, batch_id: str) -> str | None:
        for wid, w in self._workers.items():
            if batch_id in w.outstanding:
                return wid
        return None
