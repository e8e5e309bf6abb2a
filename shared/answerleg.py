"""The answer leg: from a job's final write to the gateway answering a client that was
already waiting for it (the completion message, the gateway's event loop, the response).

The batcher plans every promise about a job's latency (CORK's waits, shed mode's p99) from what
it sees: the submit stamp, the hand-off, the predict and the worker's final write. The client
sees one more leg, and under overload it is the one that grows (the gateway's loop is busy with
the submits being refused). So each gateway measures it where it ends and publishes its 99th
percentile per model (`keys.answer_leg`, one expiring entry per gateway process), and the batcher
adds the slowest live gateway's figure to the overhead it plans with.

Only answers to a waiting client count (a long-poll or `Prefer: wait` woken by the completion
message): a client that asks long after its job finished says nothing about this leg.

The 99th percentile, not the median: under overload nearly every served job is planned to finish
just inside its budget, so the served p99 is the plan plus the tail of this leg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections import deque

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import expiring, keys

log = logging.getLogger(__name__)
WINDOW = 200  # answers per model the percentile is taken over
PUBLISH_EVERY_S = 1.0
PUBLISH_TIMEOUT_S = 2.0
# A sample this large is a stalled client or a clock step, not the leg the plan should carry.
MAX_SAMPLE_MS = 1_000.0


class AnswerLegs:
    """One gateway process's measurements, published every PUBLISH_EVERY_S while they change."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.field = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._samples: dict[str, deque[float]] = {}
        self._changed: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def observe(self, model: str, finished_ms: float, answered_ms: float) -> None:
        """A waiting client's job of `model`, finished at `finished_ms` (epoch ms, the worker's
        clock), is being answered at `answered_ms`."""
        leg_ms = answered_ms - finished_ms
        if not 0 <= leg_ms <= MAX_SAMPLE_MS:
            return
        samples = self._samples.get(model)
        if samples is None:
            samples = self._samples[model] = deque(maxlen=WINDOW)
        samples.append(leg_ms)
        self._changed.add(model)

    def high_ms(self, model: str) -> float | None:
        """The 99th percentile of the model's window; None before any sample."""
        samples = self._samples.get(model)
        if not samples:
            return None
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)]

    async def publish(self) -> None:
        """Write the percentile of every model whose window changed since the last publish."""
        changed, self._changed = self._changed, set()
        for model in changed:
            high = self.high_ms(model)
            if high is not None:
                await expiring.put(self.redis, keys.answer_leg(model), self.field,
                                   {"p99_ms": round(high, 3)}, ttl_s=keys.ANSWER_LEG_TTL_S)

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name="answer-leg-publisher")

    async def stop(self) -> None:
        """Stop publishing and withdraw this process's entries (they would expire anyway)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                for model in self._samples:
                    await self.redis.hdel(keys.answer_leg(model), self.field)

    async def _forever(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(PUBLISH_EVERY_S)
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await self.publish()
                if failing:
                    log.info("answer legs published again")
                failing = False
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:  # once per outage, not once per second
                    log.warning("answer legs not published error=%s", exc)
                failing = True


async def answer_leg_s(redis: aioredis.Redis, model: str) -> float:
    """The slowest live gateway's 99th percentile of the model's answer leg, in seconds (0 when no
    gateway has measured one lately)."""
    entries = await expiring.live(redis, keys.answer_leg(model))
    return max((float(e.get("p99_ms", 0.0)) for e in entries), default=0.0) / 1000
