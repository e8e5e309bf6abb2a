"""The answer leg: from a job's final write to the gateway answering a client that was
already waiting for it (the completion message, the gateway's event loop, the response).

The batcher plans shed mode's promise (a served job's p99 within max_latency_ms) from what it
sees: the submit stamp, the hand-off, the predict and the worker's final write. The client sees
one more leg, and under overload it is the one that grows (the gateway's loop is busy with the
submits being refused). So each gateway measures it where it ends and publishes its 99th
percentile per model (`keys.answer_leg`, one expiring entry per gateway process), and the
batcher's shed plan adds the slowest live gateway's figure.

Only answers woken by the completion message count (a long-poll or `Prefer: wait` registered
before the job finished): a client that asks after its job finished says nothing about this
leg. The 99th percentile, not the median: under overload nearly every served job is planned to
finish just inside its budget, so the served p99 is the plan plus the tail of this leg.

The leg starts at `finished_ms`, stamped by the worker (or the batcher, for a job it shed) just
before its final write: exact on one host; across hosts it includes their clock skew (hosts are
expected to run NTP), and a negative leg (a gateway behind) is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import expiring, keys

log = logging.getLogger(__name__)
WINDOW = 200  # answers per model the percentile is taken over, at most
WINDOW_S = 30.0  # ... and none older than this: an old overload says nothing about now
MIN_SAMPLES = 20  # fewer answers than this in the window: nothing is published
PUBLISH_EVERY_S = 1.0
PUBLISH_TIMEOUT_S = 2.0
# A sample this large is a stalled client or a clock step, not the leg the plan should carry.
MAX_SAMPLE_MS = 1_000.0


class AnswerLegs:
    """One gateway process's measurements, published every PUBLISH_EVERY_S while they change."""

    def __init__(self, redis: aioredis.Redis,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.clock = clock
        self.field = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._samples: dict[str, deque[tuple[float, float]]] = {}  # model -> (seen_s, leg_ms)
        self._changed: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def observe(self, model: str, finished_ms: float, answered_ms: float) -> None:
        """A waiting client's job of `model`, finished at `finished_ms` (epoch ms), is being
        answered at `answered_ms` (epoch ms, this gateway's clock)."""
        leg_ms = answered_ms - finished_ms
        if not 0 <= leg_ms <= MAX_SAMPLE_MS:
            return
        samples = self._samples.get(model)
        if samples is None:
            samples = self._samples[model] = deque(maxlen=WINDOW)
        samples.append((self.clock(), leg_ms))
        self._changed.add(model)

    def high_ms(self, model: str) -> float | None:
        """The 99th percentile of the model's recent answers; None with fewer than
        MIN_SAMPLES of them in the last WINDOW_S."""
        samples = self._samples.get(model)
        if not samples:
            return None
        since = self.clock() - WINDOW_S
        while samples and samples[0][0] < since:
            samples.popleft()
        if len(samples) < MIN_SAMPLES:
            return None
        ordered = sorted(leg for _, leg in samples)
        return ordered[min(len(ordered) - 1, (len(ordered) * 99) // 100)]

    async def publish(self) -> None:
        """Write the percentile of every model with answers since the last publish (a model
        whose answers stopped is left to expire)."""
        changed, self._changed = self._changed, set()
        try:
            for model in sorted(changed):
                high = self.high_ms(model)
                if high is not None:
                    await expiring.put(self.redis, keys.answer_leg(model), self.field,
                                       {"p99_ms": round(high, 3)}, ttl_s=keys.ANSWER_LEG_TTL_S)
        except BaseException:
            self._changed |= changed  # written again at the next publish
            raise

    def start(self) -> None:
        """Publish in the background until `stop`."""
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
    """The slowest live gateway's 99th percentile of the model's answer leg, in seconds (0 when
    no gateway has measured one lately). An unreadable entry counts as no measurement: it must
    never stop the batcher that reads it."""
    try:
        entries = await expiring.live(redis, keys.answer_leg(model))
    except (ValueError, TypeError, AttributeError):  # an entry that is not ours
        return 0.0
    legs: list[float] = []
    for entry in entries:
        with contextlib.suppress(TypeError, ValueError):
            legs.append(float(entry.get("p99_ms", 0.0)))
    return max((leg for leg in legs if leg >= 0), default=0.0) / 1000
