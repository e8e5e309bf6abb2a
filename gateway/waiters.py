"""Long-poll support: one pub/sub subscription per gateway process wakes every waiting request
when its job reaches a final state. No request polls Redis in a loop."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.jobs import FINAL_STATUSES, Job

log = logging.getLogger(__name__)


class CompletionWaiters:
    """Futures keyed by job id, resolved from the FINAL_CHANNEL subscription."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._waiting: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
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
                        self._wake(str(message["data"]))
            except (RedisError, OSError) as exc:
                log.warning("completion listener reconnecting error=%s", exc)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _wake(self, job_id: str) -> None:
        for fut in self._waiting.pop(job_id, ()):
            if not fut.done():
                fut.set_result(None)

    def _wake_all(self) -> None:
        for job_id in list(self._waiting):
            self._wake(job_id)

    async def wait(self, job_id: str, fetch: Callable[[], Awaitable[Job]],
                   timeout_s: float) -> Job:
        """Return the job once final, or as it stands when `timeout_s` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            # Register before reading, so a completion between the read and the wait still wakes.
            self._waiting[job_id].add(fut)
            try:
                job = await fetch()
                remaining = deadline - loop.time()
                if job.status in FINAL_STATUSES or remaining <= 0:
                    return job
                try:
                    await asyncio.wait_for(fut, remaining)
                except TimeoutError:
                    return await fetch()
            finally:
                waiting = self._waiting.get(job_id)
                if waiting is not None:
                    waiting.discard(fut)
                    if not waiting:
                        del self._waiting[job_id]
