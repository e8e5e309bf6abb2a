"""The batcher's fenced writes: hand a batch to one worker, take over what nobody alive holds.

Both are one Lua call each that first compares the lease token (see `batcher.lease`): a batcher
whose term on the model ended changes nothing and gets `Fenced`.

Dispatch moves the batch's entries to the chosen worker's stream consumer and pushes the Celery
task onto that worker's own queue in the same step. So at every moment the group's pending list
says which worker holds which entry, and an entry is never owned by a worker that has no task
for it (no lost hand-over between two round trips).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from celery import Celery

from batcher.lease import Lease
from batcher.streams import Entry, ModelStreams, entry_key, make_entry
from shared import keys, scripts, tracing
from shared.celeryapp import BATCH_TASK
from shared.celerywire import task_message
from shared.errors import Fenced

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """An entry taken over from a consumer that is gone."""

    entry: Entry
    former: str  # the consumer that held it

    @property
    def worker_id(self) -> str | None:
        return keys.worker_of_consumer(self.former)


class Dispatcher:
    """Fenced dispatch and takeover for one model, on behalf of one batcher consumer."""

    def __init__(self, redis: aioredis.Redis, streams: ModelStreams, celery: Celery,
                 lease: Lease, stale_ms: int) -> None:
        self.redis = redis
        self.streams = streams
        self.model = streams.model
        self.celery = celery
        self.lease = lease
        self.stale_ms = stale_ms
        self._dispatch = redis.register_script(scripts.DISPATCH)
        self._takeover = redis.register_script(scripts.TAKEOVER)

    def _token(self) -> str:
        if self.lease.token is None:
            raise Fenced(self.model)
        return self.lease.token

    async def send(self, worker_id: str, batch_id: str, entries: Sequence[Entry], *,
                   solo: bool = False) -> set[str]:
        """Hand `entries` to `worker_id` as one batch; returns the keys of the entries it now
        holds (a canceled entry is left out; empty: nothing was sent)."""
        names = self.streams.names
        args: list[Any] = [self._token(), keys.BATCHER_GROUP, keys.worker_consumer(worker_id)]
        # Sub-millisecond: the worker measures the hand-off from it.
        task_args = [self.model, batch_id, [e.job_id for e in entries],
                     round(time.time() * 1000, 3)]
        refs = [f"{e.priority}/{e.entry_id}" for e in entries]
        queue = keys.worker_queue(self.model, worker_id)
        trace = tracing.dispatch(self.model, batch_id, worker_id, [
            (e.job_id, e.trace, e.submitted_ms) for e in entries]) if tracing.ON else None
        _, message = task_message(self.celery, BATCH_TASK, queue, task_args,
                                  {"solo": solo, "entries": refs},
                                  headers=trace.headers if trace else None)
        args += [message, self.streams.consumer]
        for e in entries:
            args += [names.index(e.stream) + 3, e.entry_id]  # its place in KEYS
        try:
            reply = await self._dispatch(keys=[self.lease.key, queue, *names], args=args)
        except BaseException as exc:
            if trace:
                trace.end(None, exc)
            raise
        if trace:
            trace.end(len(reply) - 1)
        kind = str(reply[0])
        if kind == "fenced":
            raise Fenced(self.model)
        if kind == "empty":
            return set()
        held: set[str] = set()
        for ref in reply[1:]:
            index, _, entry_id = str(ref).partition("/")
            held.add(entry_key(names[int(index) - 3], entry_id))
        return held

    async def takeover(self) -> list[Claimed]:
        """Claim the entries of every consumer that is gone (other batchers, dead workers), and
        those a live worker stopped keeping fresh; delete the gone consumers. One atomic step."""
        names = self.streams.names
        reply = await self._takeover(
            keys=[self.lease.key, *names],
            args=[self._token(), keys.BATCHER_GROUP, self.streams.consumer,
                  keys.WORKER_CONSUMER_PREFIX, keys.alive(self.model, ""), self.stale_ms])
        if str(reply[0]) == "fenced":
            raise Fenced(self.model)
        out: list[Claimed] = []
        flat = reply[1:]
        for i in range(0, len(flat), 4):
            stream = names[int(flat[i]) - 1]
            raw = flat[i + 3]
            fields = dict(zip(raw[::2], raw[1::2], strict=True)) if raw else None
            entry = make_entry(stream, self.streams.streams[stream], str(flat[i + 2]), fields)
            if entry is not None:
                out.append(Claimed(entry, str(flat[i + 1])))
        if out:
            formers = sorted({c.former for c in out})
            log.info("took over entries model=%s count=%d from=%s", self.model, len(out),
                     ",".join(formers))
        return out

    async def forget_worker(self, worker_id: str) -> None:
        """Delete a dead worker's queue (a task it never took), its record, and its binding to
        Celery's remote-control exchange (its name is new at every start)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(*keys.kombu_queue_keys(keys.worker_queue(self.model, worker_id)))
        pipe.hdel(keys.workers(self.model), worker_id)
        await pipe.execute()
        pidbox = keys.KOMBU_PIDBOX_BINDINGS
        stale = [m async for m in self.redis.sscan_iter(pidbox, match=f"*{worker_id}*")]
        if stale:
            await self.redis.srem(pidbox, *stale)
