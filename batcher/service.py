"""The batcher loop of one model while it holds the model's lease: the I/O around the decisions.

Each decision lives in its own pure module: when to release which batch (`batcher.cork`), which
worker can take it (`batcher.capacity`), what to do with a dead worker's entries
(`batcher.recovery`). This module feeds them events and carries out what they decide:
- new stream entries (`read`), the workers' reports that a batch's predict is over (`reports`),
  cancels (`cancels`), liveness of the workers (`liveness`) wake the decision loop (`decide`),
  which otherwise sleeps until the next computed instant; it never polls on a fixed tick;
- every write that could conflict with another batcher goes through `batcher.dispatch`, fenced
  by the lease's epoch; a `Fenced` error ends this term at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from batcher.capacity import Capacity, Outstanding, WorkerInfo
from batcher.dispatch import Claimed, Dispatcher
from batcher.latency import Overhead
from batcher.lease import Lease
from batcher.policy import BatchingPolicy, Pending, PolicyConfig, Release, Shed
from batcher.recovery import Death, Recovery, fate_of
from batcher.state import BatcherStats, published_state
from batcher.streams import Entry, ModelStreams, mono_from_epoch_ms, stream_items
from shared import keys
from shared.answerleg import answer_leg_s
from shared.errors import Fenced
from shared.heartbeats import SERVING_STATES, live_workers
from shared.modelspec import ModelSpec
from shared.settings import Settings
from shared.store import JobStore, Outcome

log = logging.getLogger(__name__)

PolicyFactory = Callable[[PolicyConfig], BatchingPolicy]
READ_BLOCK_MS = 1000
LIVENESS_S = 0.5  # how often worker liveness is checked (deaths are found within lapse + this)
TAKEOVER_EVERY_S = 5.0  # sweep for entries of consumers that vanished unseen
STATE_EVERY_S = 1.0
ORPHAN_IDLE_MS = 5000  # an entry on our own consumer this idle and known nowhere is taken back
TIMEOUT_EXIT_S = 10.0  # a worker that reported a timeout and lives on after this: it recovered


@dataclass
class Flight:
    """A batch this batcher dispatched whose predict has not been reported over."""

    batch_id: str
    worker: str
    entries: list[Entry]
    dispatched_s: float
    policy_batch: str | None  # None for a suspect group
    how: Death = "died"  # "timeout" once its worker reported the predict ran past its limit

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)


@dataclass
class _Timers:
    next_takeover_s: float = 0.0
    next_state_s: float = 0.0
    # worker -> (when, flight) of batches it reported timed out: they come back with its death
    lost: dict[str, list[tuple[float, Flight]]] = field(default_factory=dict)


class ModelBatcher:
    """Reads one model's streams and dispatches its batches for one term of its lease."""

    def __init__(self, settings: Settings, spec: ModelSpec, redis: aioredis.Redis,
                 reader: aioredis.Redis, celery: Celery, store: JobStore,
                 policy_factory: PolicyFactory, consumer: str, lease: Lease,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.spec = spec
        self.redis = redis
        self.reader = reader  # its own connections: blocking reads hold them
        self.store = store
        self.consumer = consumer
        self.clock = clock
        opts = spec.options
        self.policy = policy_factory(PolicyConfig(
            max_batch_size=opts.max_batch_size, max_latency_ms=opts.max_latency_ms,
            on_overload=opts.on_overload))
        self.streams = ModelStreams(reader, spec.name, consumer)
        # Entries a live worker stopped refreshing for this long are taken back (it refreshes
        # them on every beat while it works on them).
        stale_ms = int(2 * settings.heartbeat_lapse_s * 1000)
        self.dispatcher = Dispatcher(redis, self.streams, celery, lease, stale_ms)
        self.capacity = Capacity()
        self.lead = Overhead()  # dispatch to predict start, as seen from here
        # Final write to the answer of a waiting client, as the gateways measure it (the
        # policy's shed plan adds it).
        self.answer_leg_s = 0.0
        self.recovery = Recovery(self.policy.batch_cost_s)
        self.held: dict[str, Entry] = {}  # entry key -> entry, read and not dispatched
        self.by_job: dict[str, str] = {}  # job id -> entry key, for cancels
        self.suspects: dict[str, Entry] = {}  # entry key -> entry, waiting in recovery
        self.flights: dict[str, Flight] = {}
        self.dispatching: set[str] = set()  # entry keys inside a DISPATCH call right now
        self.lease = lease
        # Until Redis has been up for a lapse and a beat, a missing liveness key proves nothing
        # (a restart loses them, and the workers need a moment to beat again).
        self.unsettled = True
        self.stats = BatcherStats()
        self.timers = _Timers()
        self.wake = asyncio.Event()
        self.room = asyncio.Event()  # set when the read-ahead shrinks
        self._last_report = "$"
        self._batch_seq = 0
        # The term's lease token ("consumer/epoch"), not the consumer alone: a process that wins
        # the lease again counts batches from 1 again, and a worker's START takes a repeated
        # batch id for a repeat of the same call (see `scripts.START`).
        self._batch_prefix = lease.token or consumer

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def lookahead_rows(self) -> int:
        return self.settings.lookahead_batches * self.spec.options.max_batch_size

    async def run(self) -> None:
        """Serve until cancelled or fenced. Every loop runs in one TaskGroup, so an error in any
        of them ends the term here instead of disappearing."""
        await self.streams.ensure_groups()
        # Reports from here on: taken before the workers' heartbeats are first read, so no
        # batch they list can have its report slip between the two.
        self._last_report = await self._reports_cursor()
        self._accept(await self.streams.read_own_pending())
        await self._refresh_liveness()
        await self._takeover()
        cancels = self.reader.pubsub(ignore_subscribe_messages=True)
        await cancels.subscribe(keys.cancel_channel(self.model))
        try:
            async with asyncio.TaskGroup() as tg:
                for name, step in (("read", self._read_once), ("reports", self._reports_once),
                                   ("liveness", self._liveness_once),
                                   ("decide", self._decide_once),
                                   ("cancels", lambda: self._cancels_once(cancels))):
                    tg.create_task(self._forever(name, step), name=f"{name}:{self.model}")
        finally:
            await cancels.aclose()  # type: ignore[no-untyped-call]

    async def _forever(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """Repeat `step`, riding out Redis outages in place (cancelling a task blocked in a
        redis-py read is not reliable, so a crashed sibling could leave the batcher half-alive).
        `Fenced` is not ridden out: it ends the term."""
        failing_since: float | None = None
        backoff_s = 0.05
        while True:
            try:
                await step()
            except (RedisError, OSError, KombuError) as exc:
                self.unsettled = True
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("redis error model=%s loop=%s error=%s", self.model, name, exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 1.0)
                continue
            if failing_since is not None:
                log.info("redis back model=%s loop=%s after_s=%.1f", self.model, name,
                         time.monotonic() - failing_since)
                failing_since, backoff_s = None, 0.05

    # -- entries in -------------------------------------------------------------------------

    async def _read_once(self) -> None:
        if self.policy.queue_rows >= self.lookahead_rows:
            # The backlog stays in the stream where the autoscaler and other batchers see it.
            self.room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.room.wait(), 1.0)
            return
        room = self.lookahead_rows - self.policy.queue_rows
        entries = await self.streams.read(count=room, block_ms=READ_BLOCK_MS)
        if entries:
            self._accept(entries)

    def _accept(self, entries: list[Entry]) -> None:
        now, wall = self.clock(), time.time()
        for e in entries:
            if e.key in self.held or e.key in self.suspects:
                continue
            self.held[e.key] = e
            self.by_job[e.job_id] = e.key
            self.policy.add(self._pending(e, now, wall))
        self.wake.set()

    def _pending(self, e: Entry, now: float, wall: float) -> Pending:
        return Pending(
            entry_id=e.key, job_id=e.job_id, rows=e.rows, priority=e.priority,
            arrived_s=mono_from_epoch_ms(e.submitted_ms, now, wall),
            expires_s=mono_from_epoch_ms(e.expires_ms, now, wall) if e.expires_ms else None,
            deadline_s=mono_from_epoch_ms(e.deadline_ms, now, wall) if e.deadline_ms else None)

    async def _cancels_once(self, cancels: aioredis.client.PubSub) -> None:
        """Drop canceled jobs from the read-ahead: they must never reach a batch."""
        msg = await cancels.get_message(timeout=READ_BLOCK_MS / 1000)
        if msg and msg.get("type") == "message":
            key = self.by_job.pop(str(msg["data"]), None)
            if key is not None and self.held.pop(key, None) is not None:
                self.policy.remove([key])
                self.wake.set()
            if key is not None and self.suspects.pop(key, None) is not None:
                self.recovery.discard([key])

    # -- reports from workers ---------------------------------------------------------------

    async def _reports_cursor(self) -> str:
        last = await self.reader.xrevrange(keys.completions(self.model), count=1)
        return str(last[0][0]) if last else "0-0"

    async def _reports_once(self) -> None:
        stream = keys.completions(self.model)
        reply = await self.reader.xread({stream: self._last_report}, block=READ_BLOCK_MS,
                                        count=100)
        for _, entries in stream_items(reply):
            for entry_id, fields in entries:
                self._last_report = entry_id
                self._on_report(fields)

    def _on_report(self, fields: dict[str, str]) -> None:
        """A worker says a batch's predict is over (or failed, or timed out): its lane is free.
        The batch's latency feeds the fit: the predict span the worker measured, plus the fixed
        overhead seen from here (everything from dispatch but the predict and its queueing)."""
        batch_id, worker = fields.get("batch", ""), fields.get("worker", "")
        self.capacity.reported(worker, batch_id, self.clock())
        flight = self.flights.pop(batch_id, None)
        self.wake.set()
        if flight is None:
            return  # a batch of another term
        now = self.clock()
        outcome = fields.get("outcome", "ok")
        if outcome == "timeout":
            # The worker exits; its entries come back through its death, split at once.
            flight.how = "timeout"
            self.timers.lost.setdefault(worker, []).append((now, flight))
            return
        predict_s = float(fields.get("predict_ms", 0)) / 1000
        if outcome != "ok" or predict_s <= 0:
            self._end_flight(flight)
            return
        self.recovery.done(batch_id)
        queued_s = float(fields.get("lane_wait_ms", 0)) / 1000
        tail_s = float(fields.get("tail_ms", 0)) / 1000
        lead_s = max(0.0, now - flight.dispatched_s - predict_s - queued_s)
        self.lead.observe(lead_s)
        self.capacity.lead_s = self.lead.value_s
        if flight.policy_batch is not None:
            self.policy.on_complete(flight.policy_batch, flight.rows, predict_s, lead_s + tail_s)
        handoff = fields.get("handoff_ms")
        self.stats.done(now, flight.rows, float(handoff) if handoff else None)

    def _end_flight(self, flight: Flight) -> None:
        """A batch is over without a usable report (it failed, or its report was lost): its
        jobs were finished by its worker, or come back when nobody refreshes their entries."""
        self.flights.pop(flight.batch_id, None)
        if flight.policy_batch is not None:
            self.policy.forget(flight.policy_batch)
        self.recovery.done(flight.batch_id)
        self.wake.set()

    # -- liveness and recovery ----------------------------------------------------------------

    async def _liveness_once(self) -> None:
        await self._refresh_liveness()
        now = self.clock()
        if now >= self.timers.next_takeover_s:
            await self._takeover()
            await self._sweep_own()
        if now >= self.timers.next_state_s:
            self.answer_leg_s = await answer_leg_s(self.redis, self.model)
            self.policy.answer_leg(self.answer_leg_s)
            await self._publish_state(now)
            self.timers.next_state_s = now + STATE_EVERY_S
        await asyncio.sleep(LIVENESS_S)

    async def _settled(self) -> bool:
        """Whether Redis has been up long enough for liveness keys to mean something."""
        if self.unsettled:
            info = await self.redis.info("server")
            lapse_s = self.settings.heartbeat_lapse_s + 2 * self.settings.heartbeat_interval_s
            self.unsettled = float(info.get("uptime_in_seconds", 0)) < lapse_s
        return not self.unsettled

    async def _refresh_liveness(self) -> None:
        records = await live_workers(self.redis, self.model)
        infos = [WorkerInfo(str(r["name"]), int(r.get("lanes", r.get("slots", 1))),
                            r.get("state") in SERVING_STATES, tuple(r.get("batches") or ()),
                            int(r.get("beat", 0)))
                 for r in records]
        before = self.capacity.lanes
        settled = await self._settled()
        synced = self.capacity.sync(infos, self.clock(), keep_missing=not settled)
        if self.capacity.lanes != before:
            log.info("capacity model=%s lanes=%d workers=%d", self.model, self.capacity.lanes,
                     self.capacity.workers)
            self.wake.set()
        for worker, lost in synced.lost:
            flight = self.flights.get(lost.batch_id)
            log.warning("report lost model=%s worker=%s batch=%s", self.model, worker,
                        lost.batch_id)
            if flight is not None:
                self._end_flight(flight)
        gone: dict[str, list[Outstanding]] = synced.gone
        now = self.clock()
        for worker, parked in list(self.timers.lost.items()):
            if worker not in self.capacity:
                gone.setdefault(worker, [])
            elif parked and now - parked[0][0] > TIMEOUT_EXIT_S:
                # It reported a timeout and lives on: its predict came back after all.
                for _, flight in self.timers.lost.pop(worker):
                    self._end_flight(flight)
        if gone:
            for worker in gone:
                log.warning("worker dead model=%s worker=%s batches=%d", self.model, worker,
                            len(gone[worker]))
            self.stats.deaths += len(gone)
            await self._takeover(dead=set(gone))

    async def _takeover(self, dead: set[str] | None = None) -> None:
        """Claim what nobody alive holds, and sort it: back to the queue, suspects, or done."""
        self.timers.next_takeover_s = self.clock() + TAKEOVER_EVERY_S
        if not await self._settled():
            return
        claimed = await self.dispatcher.takeover()
        # Workers whose entries were claimed and who are not live (a live worker only loses
        # the entries it stopped refreshing: a batch it gave up on).
        dead = set(dead or ()) | {c.worker_id for c in claimed
                                  if c.worker_id and c.worker_id not in self.capacity}
        flights = [f for f in self.flights.values() if f.worker in dead]
        for worker in dead:
            flights += [f for _, f in self.timers.lost.pop(worker, [])]
        for f in flights:
            self.flights.pop(f.batch_id, None)
            if f.policy_batch is not None:
                self.policy.forget(f.policy_batch)
        await self._sort_claimed(claimed, flights)
        for worker in dead:
            await self.dispatcher.forget_worker(worker)
        self.wake.set()

    async def _sweep_own(self) -> None:
        """Entries pending on our own consumer that we know nowhere (a takeover interrupted
        by an error after its script ran, a dispatch rolled back by a Redis restart): take them
        in again, as the takeover would."""
        known = set(self.held) | set(self.suspects) | self.dispatching
        orphans = await self.streams.own_idle(ORPHAN_IDLE_MS, known)
        if orphans:
            log.warning("orphans on own consumer model=%s count=%d", self.model, len(orphans))
            await self._sort_claimed([Claimed(e, self.consumer) for e in orphans], [])

    async def _sort_claimed(self, claimed: list[Claimed], flights: list[Flight]) -> None:
        """Sort claimed entries by their job's status (`batcher.recovery.fate_of`): queued
        ones go back to the policy, running ones become suspects (grouped by the batch they
        were in, when known), the rest are dropped."""
        statuses = await self.store.statuses([c.entry.job_id for c in claimed])
        requeue: list[Entry] = []
        drop: list[Entry] = []
        running: dict[str, Entry] = {}
        for c, status in zip(claimed, statuses, strict=True):
            fate = fate_of(status)
            if fate == "requeue":
                requeue.append(c.entry)
            elif fate == "drop":
                drop.append(c.entry)
            else:
                running[c.entry.key] = c.entry
        if drop:
            await self.streams.drop(drop)
        self.recovery.discard(e.key for e in drop + requeue)
        for e in drop + requeue:
            self.suspects.pop(e.key, None)
        for f in flights:
            keys_of = [e.key for e in f.entries if e.key in running]
            if f.policy_batch is not None or self.recovery.died(f.batch_id) is None:
                self.recovery.add(keys_of, f.how)
            for k in keys_of:
                self.suspects[k] = running.pop(k)
        # Held by a worker this term never dispatched to: groups of at most one full batch.
        left = list(running)
        size = self.spec.options.max_batch_size
        for i in range(0, len(left), size):
            self.recovery.add(left[i:i + size], "died")
        self.suspects.update(running)
        for e in self.suspects.values():
            self.by_job[e.job_id] = e.key
        self.stats.requeued += len(requeue)
        if requeue:
            self._accept(requeue)
        if claimed:
            log.info("recovered model=%s requeued=%d suspects=%d done=%d", self.model,
                     len(requeue), len(self.recovery), len(drop))

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
            now = self.clock()
            group = self.recovery.next_group()
            alone = self.capacity.pick(now, alone=True) if group is not None else None
            if group is not None and alone is not None:
                entries = [self.suspects[k] for k in group.keys if k in self.suspects]
                batch_id = self._new_batch_id("suspects")
                self.recovery.dispatched(group, batch_id)
                self.stats.suspects_run += 1
                await self._dispatch(alone, batch_id, entries, "suspects", None, group.solo)
                continue
            decision = self.policy.decide(self.capacity.free_lanes(now), self.capacity.lanes)
            if isinstance(decision, Release):
                worker = self.capacity.pick(now)
                entries = [self.held.pop(p.entry_id) for p in decision.entries
                           if p.entry_id in self.held]
                if worker is None or not entries:  # the policy and capacity disagree: no lane
                    self._restore(entries, decision.batch_id)
                    return self.capacity.next_change_s(now)
                await self._dispatch(worker, self._new_batch_id(decision.batch_id), entries,
                                     decision.reason, decision.batch_id)
                continue
            if isinstance(decision, Shed):
                await self._shed(decision)
                continue
            until = _earliest(decision.until_s, self.capacity.next_change_s(now))
            return None if until is None else max(0.0, until - now)

    def _new_batch_id(self, name: str) -> str:
        self._batch_seq += 1
        return f"{self._batch_prefix}:{name}:{self._batch_seq}"

    async def _dispatch(self, worker: str, batch_id: str, entries: list[Entry], reason: str,
                        policy_batch: str | None, solo: bool = False) -> None:
        now = self.clock()
        rows = sum(e.rows for e in entries)
        self.dispatching = {e.key for e in entries}
        try:
            held = await self.dispatcher.send(worker, batch_id, entries, solo=solo)
        except (RedisError, OSError):
            # Not handed over (or not known to be): the entries wait again. If the script did
            # run, they are the worker's now and the next dispatch leaves them out.
            self._restore(entries, policy_batch)
            if policy_batch is None:
                self.recovery.undispatched(batch_id)
            raise
        finally:
            self.dispatching = set()
        sent = [e for e in entries if e.key in held]
        for e in entries:
            self.by_job.pop(e.job_id, None)
            self.suspects.pop(e.key, None)
        if not sent:
            if policy_batch is not None:
                self.policy.forget(policy_batch)
            else:
                self.recovery.done(batch_id)
            return
        self.flights[batch_id] = Flight(batch_id, worker, sent, now, policy_batch)
        self.capacity.dispatched(worker, batch_id, now, self.policy.predict_s(rows))
        if policy_batch is None:
            self.capacity.isolate(worker, batch_id)
        wall = time.time()
        self.stats.dispatched(reason, sum(e.rows for e in sent),
                              [wall - e.submitted_ms / 1000 for e in sent])
        self.room.set()
        if worker not in self.capacity:  # it died while the batch was on its way
            await self._takeover(dead={worker})

    def _restore(self, entries: list[Entry], policy_batch: str | None) -> None:
        if policy_batch is not None:
            self.policy.forget(policy_batch)
            self._accept(entries)

    async def _shed(self, decision: Shed) -> None:
        entries = [self.held.pop(p.entry_id) for p in decision.entries if p.entry_id in self.held]
        if not entries:
            return
        for e in entries:
            self.by_job.pop(e.job_id, None)
        status, err = shed_outcome(decision.reason, self.spec.options.max_latency_ms)
        await self.store.finish([Outcome(e.job_id, status, error=err) for e in entries],
                                fence=self._fence())
        await self.streams.drop(entries)
        self.stats.shed_jobs(decision.reason, len(entries))

    # -- published state ----------------------------------------------------------------------

    def _fence(self) -> tuple[str, str]:
        if self.lease.token is None:
            raise Fenced(self.model)
        return self.lease.key, self.lease.token

    async def _publish_state(self, now: float) -> None:
        self._fence()  # a batcher whose term ended publishes nothing
        state = published_state(
            snap=self.policy.snapshot(), stats=self.stats, now=now, batcher=self.consumer,
            in_flight=len(self.flights), held=len(self.held), suspects=len(self.recovery),
            lanes=self.capacity.lanes, free_lanes=self.capacity.free_lanes(now),
            workers=self.capacity.workers, lead_s=self.lead.value_s,
            answer_leg_s=self.answer_leg_s,
            lane_free_in_s=self.capacity.free_in_s(now))
        await self.redis.set(keys.batcher_state(self.model), json.dumps(state),
                             ex=keys.BATCHER_STATE_TTL_S)


def shed_outcome(reason: str, max_latency_ms: float) -> tuple[str, dict[str, str]]:
    """The final status and error of a job the batcher drops, by the policy's reason."""
    if reason == "deadline_exceeded":
        return "expired", {"type": "deadline_exceeded",
                           "message": "the job's deadline passed before it could start"}
    if reason == "expired":
        return "expired", {"type": "expired", "message": "the job waited longer than its ttl_s"}
    return "failed", {"type": "overloaded", "message": "the model cannot serve this job "
                      f"within max_latency_ms={max_latency_ms:g}"}


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
