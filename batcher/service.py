"""The batcher loop of one model: the I/O around a batching policy.

Events (new entries, batch completions, a worker appearing) wake the loop; otherwise it sleeps
until the policy's next decision time. It never polls on a fixed tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import statistics
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from celery import Celery
from redis.exceptions import RedisError

from batcher.policy import BatchingPolicy, Pending, PolicyConfig, Release, Shed
from batcher.stats import WaitHistogram
from batcher.streams import Entry, ModelStreams, mono_from_epoch_ms, stream_items
from shared import keys
from shared.celeryapp import BATCH_TASK
from shared.heartbeats import live_workers
from shared.modelspec import ModelSpec
from shared.settings import Settings
from shared.store import JobStore, Outcome

log = logging.getLogger(__name__)

PolicyFactory = Callable[[PolicyConfig], BatchingPolicy]
READ_BLOCK_MS = 1000
REFRESH_S = 1.0


@dataclass
class InFlight:
    policy_batch_id: str | None  # None for retries, which the policy never saw
    rows: int
    dispatched_s: float
    entries: list[Entry]


class ModelBatcher:
    """Reads one model's streams and dispatches its batches while it holds the model's lease."""

    def __init__(self, settings: Settings, spec: ModelSpec, redis: aioredis.Redis,
                 reader: aioredis.Redis, celery: Celery, store: JobStore,
                 policy_factory: PolicyFactory, consumer: str) -> None:
        self.settings = settings
        self.spec = spec
        self.redis = redis
        self.reader = reader  # its own connection: a blocking read holds it
        self.celery = celery
        self.store = store
        self.consumer = consumer
        opts = spec.options
        self.policy = policy_factory(PolicyConfig(
            max_batch_size=opts.max_batch_size, max_latency_ms=opts.max_latency_ms,
            on_overload=opts.on_overload))
        self.streams = ModelStreams(reader, spec.name, consumer)
        self.held: dict[str, Entry] = {}
        self.retries: list[Entry] = []
        self.in_flight: dict[str, InFlight] = {}
        self.slots = 0
        self.wake = asyncio.Event()
        self.room = asyncio.Event()  # set when the read-ahead shrinks
        self.reasons: Counter[str] = Counter()
        self._last_report = "$"
        self.batch_rows: Counter[int] = Counter()
        self.handoffs_ms: deque[float] = deque(maxlen=50)
        self.queue_wait = WaitHistogram()
        self._next_reclaim = 0.0
        self.completed_rows: list[tuple[float, int]] = []
        # Above the longest a healthy batch can hold its entries: its time limit, with margin.
        self.reclaim_idle_ms = int(1000 * max(settings.reclaim_idle_s,
                                              opts.batch_timeout_s * 1.5))

    @property
    def lookahead_rows(self) -> int:
        return self.settings.lookahead_batches * self.spec.options.max_batch_size

    def free_slots(self) -> int:
        return max(0, self.slots - len(self.in_flight))

    async def run(self) -> None:
        """Serve until cancelled. Every background task is awaited via TaskGroup, so an error in
        any of them surfaces here instead of disappearing."""
        await self.streams.ensure_groups()
        self._accept(await self.streams.read_own_pending())
        self._cancels = self.reader.pubsub(ignore_subscribe_messages=True)
        await self._cancels.subscribe(keys.cancel_channel(self.spec.name))
        try:
            async with asyncio.TaskGroup() as tg:
                for name, step in (("read", self._read_once), ("done", self._completions_once),
                                   ("refresh", self._refresh_once),
                                   ("decide", self._decide_once),
                                   ("cancel", self._cancels_once)):
                    tg.create_task(self._forever(name, step), name=f"{name}:{self.spec.name}")
        finally:
            await self._cancels.aclose()  # type: ignore[no-untyped-call]

    async def _forever(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """Repeat `step`, riding out Redis outages in place. Redis errors must not tear the loops
        down: cancelling a task blocked in a redis-py read is not reliable, so a crashed sibling
        could leave the batcher half-alive."""
        failing_since: float | None = None
        backoff_s = 0.05
        while True:
            try:
                await step()
            except (RedisError, OSError) as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("redis error model=%s loop=%s error=%s", self.spec.name, name,
                                exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
                continue
            if failing_since is not None:
                log.info("redis back model=%s loop=%s after_s=%.1f", self.spec.name, name,
                         time.monotonic() - failing_since)
                failing_since, backoff_s = None, 0.05

    # -- events -----------------------------------------------------------------------------

    async def _read_once(self) -> None:
        if self.policy.queue_rows >= self.lookahead_rows:
            # The backlog stays in the stream where the autoscaler and other batchers see it.
            await self._wait_for_room()
            return
        room = self.lookahead_rows - self.policy.queue_rows
        entries = await self.streams.read(count=room, block_ms=READ_BLOCK_MS)
        if entries:
            self._accept(entries)

    async def _wait_for_room(self) -> None:
        self.room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.room.wait(), REFRESH_S)

    def _accept(self, entries: list[Entry]) -> None:
        now, wall = time.monotonic(), time.time()
        for e in entries:
            if e.entry_id in self.held:
                continue
            self.held[e.entry_id] = e
            self.policy.add(Pending(
                entry_id=e.entry_id, job_id=e.job_id, rows=e.rows, priority=e.priority,
                arrived_s=mono_from_epoch_ms(e.submitted_ms, now, wall),
                expires_s=mono_from_epoch_ms(e.expires_ms, now, wall) if e.expires_ms else None))
        self.wake.set()

    async def _completions_once(self) -> None:
        stream = keys.completions(self.spec.name)
        reply = await self.reader.xread({stream: self._last_report}, block=READ_BLOCK_MS,
                                        count=100)
        for _, entries in stream_items(reply):
            for entry_id, fields in entries:
                self._last_report = entry_id
                self._complete(fields.get("batch", ""), int(fields.get("rows", 0)))
                if fields.get("handoff_ms"):
                    self.handoffs_ms.append(float(fields["handoff_ms"]))

    async def _cancels_once(self) -> None:
        """Drop canceled entries from the read-ahead: they must never reach a batch."""
        msg = await self._cancels.get_message(timeout=READ_BLOCK_MS / 1000)
        if msg and msg.get("type") == "message":
            entry_id = str(msg["data"])
            if self.held.pop(entry_id, None) is not None:
                self.policy.remove([entry_id])
                self.wake.set()

    def _complete(self, batch_id: str, rows: int) -> None:
        flight = self.in_flight.pop(batch_id, None)
        if flight is None:
            return  # another batcher's batch, or one already forgotten
        now = time.monotonic()
        if flight.policy_batch_id is not None:
            self.policy.on_complete(flight.policy_batch_id, flight.rows, now - flight.dispatched_s)
        self.completed_rows.append((now, flight.rows))
        self.wake.set()

    async def _refresh_once(self) -> None:
        """Capacity from heartbeats, recovery of lost entries, and the published live values."""
        workers = await live_workers(self.redis, self.spec.name)
        slots = sum(int(w["slots"]) for w in workers if w["state"] in ("ready", "busy"))
        if slots != self.slots:
            log.info("capacity model=%s slots=%d workers=%d", self.spec.name, slots,
                     len(workers))
            self.slots = slots
            self.wake.set()
        now = time.monotonic()
        self._forget_lost(now)
        if now >= self._next_reclaim:
            await self._recover()
            self._next_reclaim = now + max(1.0, self.reclaim_idle_ms / 4000)
        await self._publish_state(now, len(workers))
        await asyncio.sleep(REFRESH_S)

    def _forget_lost(self, now: float) -> None:
        limit = self.reclaim_idle_ms / 1000
        for batch_id, flight in list(self.in_flight.items()):
            if now - flight.dispatched_s > limit:
                # No report will come (its worker died); its entries come back via reclaim.
                del self.in_flight[batch_id]
                if flight.policy_batch_id is not None:
                    self.policy.forget(flight.policy_batch_id)
                log.warning("batch lost model=%s batch=%s", self.spec.name, batch_id)

    async def _recover(self) -> None:
        found = await self.streams.take_over_held({self.consumer})
        stale = await self.streams.reclaim_stale(self.reclaim_idle_ms)
        fresh = [e for e in stale if e.entry_id not in self.held]
        if found:
            self._accept(found)
        if fresh:
            log.warning("reclaimed model=%s count=%d", self.spec.name, len(fresh))
            self.retries.extend(fresh)
            self.wake.set()

    # -- decisions --------------------------------------------------------------------------

    async def _decide_once(self) -> None:
        self.wake.clear()
        timeout = await self._step()
        if timeout is None or timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _step(self) -> float | None:
        """Act on every decision due now; returns how long to sleep (None: until an event)."""
        while True:
            if self.retries or self._suspect_in_flight():
                # Entries that were in flight when something died run one at a time with nothing
                # else in flight: if one of them is what kills workers, it takes down no batch
                # mates, and the jobs it shares a worker with are not charged an attempt.
                if self.retries and not self.in_flight and self.free_slots():
                    await self._dispatch([self.retries.pop(0)], "retry")
                    continue
                return None
            decision = self.policy.decide(self.free_slots())
            if isinstance(decision, Release):
                entries = [self.held.pop(p.entry_id) for p in decision.entries
                           if p.entry_id in self.held]
                if entries:
                    await self._dispatch(entries, decision.reason, decision.batch_id)
                continue
            if isinstance(decision, Shed):
                await self._shed(decision)
                continue
            if decision.until_s is None:
                return None
            return max(0.0, decision.until_s - time.monotonic())

    def _suspect_in_flight(self) -> bool:
        return any(f.policy_batch_id is None for f in self.in_flight.values())

    async def _dispatch(self, entries: list[Entry], reason: str,
                        policy_batch_id: str | None = None) -> None:
        batch_id = f"{self.consumer}:{policy_batch_id or 'retry-' + uuid.uuid4().hex[:8]}"
        await self.streams.hand_over(entries)
        self.in_flight[batch_id] = InFlight(policy_batch_id, sum(e.rows for e in entries),
                                            time.monotonic(), entries)
        # Sub-millisecond: the worker measures the Celery hand-off from it (a few ms).
        args = [self.spec.name, batch_id, [e.job_id for e in entries],
                round(time.time() * 1000, 3)]
        await asyncio.wait_for(asyncio.to_thread(
            self.celery.send_task, BATCH_TASK, args=args,
            queue=keys.celery_queue(self.spec.name)), timeout=10)
        self.reasons[reason] += 1
        self.batch_rows[sum(e.rows for e in entries)] += 1
        wall = time.time()
        for e in entries:
            self.queue_wait.observe(wall - e.submitted_ms / 1000)
        self.room.set()

    async def _shed(self, decision: Shed) -> None:
        entries = [self.held.pop(p.entry_id) for p in decision.entries if p.entry_id in self.held]
        if not entries:
            return
        expired = decision.reason == "expired"
        status = "expired" if expired else "failed"
        err = ({"type": "expired", "message": "the job waited longer than its ttl_s"} if expired
               else {"type": "overloaded", "message": "the model cannot serve this job within "
                     f"max_latency_ms={self.spec.options.max_latency_ms}"})
        await self.store.finish([Outcome(e.job_id, status, error=err) for e in entries])
        await self.streams.drop(entries)
        self.reasons[decision.reason] += len(entries)

    async def _publish_state(self, now: float, workers: int) -> None:
        self.completed_rows = [(t, n) for t, n in self.completed_rows if now - t <= 30]
        span = min(30.0, max(1.0, now - self.completed_rows[0][0])) if self.completed_rows else 30
        snap = self.policy.snapshot()
        state = {
            "a_s": snap.a_s, "b_s": snap.b_s, "avg_wait_ms": snap.avg_wait_ms,
            "in_flight": len(self.in_flight), "queue_rows": snap.queue_rows,
            "held": len(self.held), "retries": len(self.retries), "slots": self.slots,
            "free_slots": self.free_slots(), "workers": workers, "warning": snap.warning,
            "drain_rows_per_s": sum(n for _, n in self.completed_rows) / span,
            "dispatch_reasons": dict(self.reasons), "batcher": self.consumer,
            "batch_rows": dict(self.batch_rows), "queue_wait": self.queue_wait.as_dict(),
            # Median over the last batches of the Celery hand-off (send to the task's start).
            "handoff_ms_p50": statistics.median(self.handoffs_ms) if self.handoffs_ms else None,
        }
        await self.redis.set(keys.batcher_state(self.spec.name), json.dumps(state),
                             ex=keys.BATCHER_STATE_TTL_S)

