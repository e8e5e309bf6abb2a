"""Long-poll support: one pub/sub subscription per gateway process wakes every waiting request
when its job reaches a final state. No request polls Redis in a loop, and a request woken with
the record in the message (keys.FINAL_CHANNEL) answers from it without reading Redis again.

Jobs this process submitted are "fresh" for FRESH_S: while the subscription has stayed up since
before their submit, every final message about them has been seen here, so a long-poll on one
needs no read of Redis at all: it answers from the message already received, or waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.answerleg import AnswerLegs
from shared.jobs import FINAL_STATUSES, Job

log = logging.getLogger(__name__)
Fields = dict[str, str]
FRESH_S = 10.0
FRESH_MAX = 100_000


@dataclass
class _Fresh:
    epoch: int
    noted_s: float
    record: str | None = None  # the final message's record ("" when it carried only the id)



class CompletionWaiters:
    """Futures keyed by job id, resolved from the FINAL_CHANNEL subscription with the job's
    record fields, or None when the message carried only the id."""

    def __init__(self, redis: aioredis.Redis, legs: AnswerLegs | None = None) -> None:
        self.redis = redis
        self.legs = legs  # measures the answer leg of the clients that were waiting
        self._waiting: dict[str, set[asyncio.Future[Fields | None]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # Bumped whenever the subscription is lost or made: a fresh job noted under another
        # epoch may have missed its message.
        self._epoch = 0
        self._live = False
        self._fresh: dict[str, _Fresh] = {}  # insertion order is age order
        # Event streams (SSE) following a job: "running", "final", or "check" (a message may
        # have been missed while the subscription was down).
        self._listeners: dict[str, set[asyncio.Queue[str]]] = defaultdict(set)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="completion-listener")

    async def stop(self) -> None:
        """Stop listening. redis-py on Python 3.11 can swallow a cancellation (it wraps sends in
        wait_for), so the loop also checks a flag at every bounded read, and the wait is bounded."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=3)
            if not done:
                log.warning("completion listener did not stop in time")

    async def _listen(self) -> None:
        backoff_s = 0.1
        while not self._stopping:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.FINAL_CHANNEL, keys.RUNNING_CHANNEL)
                backoff_s = 0.1
                while not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if not message:
                        continue
                    if message.get("type") == "subscribe":
                        # Confirmed: every message from here on reaches us.
                        self._epoch += 1
                        self._live = True
                        # Anything that finished while we were not subscribed: let waiters
                        # re-check.
                        self._wake_all()
                        self._tell_all("check")
                    elif message.get("type") == "message" and (
                            str(message.get("channel")) == keys.RUNNING_CHANNEL):
                        self._tell(str(message["data"]), "running")
                    elif message.get("type") == "message":
                        job_id, _, record = str(message["data"]).partition("\n")
                        fresh = self._fresh.get(job_id)
                        if fresh is not None:
                            fresh.record = record
                        self._wake(job_id, record)
                        self._tell(job_id, "final")
            except (RedisError, OSError) as exc:
                log.warning("completion listener reconnecting error=%s", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                self._live = False
                self._epoch += 1
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def note_submitted(self, job_ids: list[str]) -> None:
        """Call before the jobs are written: their final messages will be kept for FRESH_S."""
        if not self._live:
            return
        now = time.monotonic()
        for job_id in job_ids:
            self._fresh[job_id] = _Fresh(self._epoch, now)
        while self._fresh:
            oldest = next(iter(self._fresh))
            if now - self._fresh[oldest].noted_s < FRESH_S and len(self._fresh) <= FRESH_MAX:
                break
            del self._fresh[oldest]

    def _wake(self, job_id: str, record: str = "") -> None:
        futures = self._waiting.pop(job_id, None)
        if not futures:
            return
        # Parsed only when someone waits for this job, once for all of its waiters.
        fields: Fields | None = json.loads(record) if record else None
        for fut in futures:
            if not fut.done():
                fut.set_result(fields)

    def listen(self, job_id: str) -> asyncio.Queue[str]:
        """Follow a job's status changes (until `unlisten`)."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._listeners[job_id].add(queue)
        return queue

    def unlisten(self, job_id: str, queue: asyncio.Queue[str]) -> None:
        listeners = self._listeners.get(job_id)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[job_id]

    def _tell(self, job_id: str, event: str) -> None:
        for queue in self._listeners.get(job_id, ()):
            queue.put_nowait(event)

    def _tell_all(self, event: str) -> None:
        for job_id in list(self._listeners):
            self._tell(job_id, event)

    def _wake_all(self) -> None:
        for job_id in list(self._waiting):
            self._wake(job_id)

    async def wait(self, job_id: str, fetch: Callable[[], Awaitable[Job]], timeout_s: float,
                   build: Callable[[Fields], Job]) -> Job:
        """Return the job once final, or as it stands when `timeout_s` passes. `fetch` reads
        the job from Redis; `build` makes it from the record fields a wake-up carried (both
        apply the caller's access check)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        fresh = self._fresh.get(job_id)
        # Without a read is safe only if no message about the job can have been missed.
        unread = fresh is not None and fresh.epoch == self._epoch and self._live
        while True:
            if unread and fresh is not None and fresh.record is not None:
                if fresh.record:  # it finished and the message carried the record
                    del self._fresh[job_id]
                    return build(json.loads(fresh.record))
                unread = False  # it finished, the message carried only the id: read it
            fut: asyncio.Future[Fields | None] = loop.create_future()
            # Register before reading, so a completion between the read and the wait still wakes.
            self._waiting[job_id].add(fut)
            try:
                job = None if unread else await fetch()
                remaining = deadline - loop.time()
                if job is not None and (job.status in FINAL_STATUSES or remaining <= 0):
                    return job
                if remaining <= 0:
                    return await fetch()
                try:
                    fields = await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return await fetch()
                if fields is not None:
                    self._fresh.pop(job_id, None)
                    return self._woken(build, fields)
                unread = False  # woken without a record: read it
            finally:
                waiting = self._waiting.get(job_id)
                if waiting is not None:
                    waiting.discard(fut)
                    if not waiting:
                        del self._waiting[job_id]

    def _woken(self, build: Callable[[Fields], Job], fields: Fields) -> Job:
        """The job from the final message that woke its waiting client: a sample of the
        answer leg (only such a client was waiting when the job finished)."""
        job = build(fields)
        finished_ms = fields.get("finished_ms")
        if self.legs is not None and finished_ms:
            with contextlib.suppress(ValueError):
                self.legs.observe(job.model, float(finished_ms), time.time() * 1000)
        return job
