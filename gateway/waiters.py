"""Long-poll support: one pub/sub subscription per gateway process wakes every waiting request
when its job reaches a final state. No request polls Redis in a loop, and a request woken with
the record in the message (keys.FINAL_CHANNEL) answers from it without reading Redis again."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.jobs import FINAL_STATUSES, Job

log = logging.getLogger(__name__)
Fields = dict[str, str]


class CompletionWaiters:
    """Futures keyed by job id, resolved from the FINAL_CHANNEL subscription with the job's
    record fields, or None when the message carried only the id."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._waiting: dict[str, set[asyncio.Future[Fields | None]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

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
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.FINAL_CHANNEL)
                # Anything that finished while we were not subscribed: let waiters re-check.
                self._wake_all()
                backoff_s = 0.1
                while not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        job_id, _, record = str(message["data"]).partition("\n")
                        self._wake(job_id, record)
            except (RedisError, OSError) as exc:
                log.warning("completion listener reconnecting error=%s", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _wake(self, job_id: str, record: str = "") -> None:
        futures = self._waiting.pop(job_id, None)
        if not futures:
            return
        # Parsed only when someone waits for this job, once for all of its waiters.
        fields: Fields | None = json.loads(record) if record else None
        for fut in futures:
            if not fut.done():
                fut.set_result(fields)

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
        while True:
            fut: asyncio.Future[Fields | None] = loop.create_future()
            # Register before reading, so a completion between the read and the wait still wakes.
            self._waiting[job_id].add(fut)
            try:
                job = await fetch()
                remaining = deadline - loop.time()
                if job.status in FINAL_STATUSES or remaining <= 0:
                    return job
                try:
                    fields = await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return await fetch()
                if fields is not None:
                    return build(fields)
            finally:
                waiting = self._waiting.get(job_id)
                if waiting is not None:
                    waiting.discard(fut)
                    if not waiting:
                        del self._waiting[job_id]
