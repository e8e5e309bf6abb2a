"""One active batcher per model: a Redis lease whose every term carries a new epoch.

The lease's value is a token "holder/epoch". Renewals, and every dispatch and takeover (see
`batcher.dispatch`), compare it inside Redis, so a batcher whose term ended (it was paused past
the lease, or cut off from Redis) cannot change anything: its next fenced call fails and it stops
serving that model at once. A standby retries the lease and takes over within `lease_ttl_s`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys, scripts
from shared.errors import Fenced

log = logging.getLogger(__name__)

# A serve task that does not finish this long after its cancel is stuck in an uncancellable
# call; the process exits (its supervisor restarts it) rather than leave it running.
STOP_GRACE_S = 5.0
EXIT_STUCK = 75


class Lease:
    """The lease on one model. `token` is the current term's, None while not held."""

    def __init__(self, redis: aioredis.Redis, model: str, holder: str, ttl_s: float) -> None:
        self.redis = redis
        self.model = model
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self.token: str | None = None
        self._acquire = redis.register_script(scripts.LEASE_ACQUIRE)
        self._renew = redis.register_script(scripts.LEASE_RENEW)
        self._release = redis.register_script(scripts.LEASE_RELEASE)

    @property
    def key(self) -> str:
        return keys.lease(self.model)

    async def acquire(self) -> bool:
        token = await self._acquire(keys=[self.key, keys.lease_epoch(self.model)],
                                    args=[self.holder, self.ttl_ms])
        self.token = str(token) if token else None
        return self.token is not None

    async def renew(self) -> bool:
        if self.token is None:
            return False
        held = bool(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        if not held:
            self.token = None
        return held

    async def release(self) -> None:
        if self.token is not None:
            await self._release(keys=[self.key], args=[self.token])
            self.token = None


async def serve_while_leader(lease: Lease,
                             serve: Callable[[Lease], Coroutine[Any, Any, None]]) -> None:
    """Forever: wait for the lease, run `serve(lease)` while renewals succeed, stop it when one
    fails or when it ends (a fenced call raises `Fenced` inside it)."""
    period_s = lease.ttl_ms / 3000
    model = lease.model
    while True:
        try:
            got = await lease.acquire()
        except (RedisError, OSError) as exc:
            log.warning("lease unreachable model=%s error=%s", model, exc)
            got = False
        if not got:
            await asyncio.sleep(period_s)
            continue
        log.info("leader model=%s token=%s", model, lease.token)
        task: asyncio.Task[None] = asyncio.create_task(serve(lease), name=f"serve:{model}")
        renewed_s = time.monotonic()
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=period_s)
                if done:
                    break
                try:
                    held = await lease.renew()
                except (RedisError, OSError) as exc:
                    # Unknown, not lost: retry until the lease would have run out by now.
                    if time.monotonic() - renewed_s < 0.8 * lease.ttl_ms / 1000:
                        log.warning("lease renew failed, retrying model=%s error=%s", model,
                                    exc)
                        continue
                    held = False
                if not held:
                    log.warning("lease lost model=%s holder=%s", model, lease.holder)
                    break
                renewed_s = time.monotonic()
        finally:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=STOP_GRACE_S)
            if not done:
                log.error("batcher did not stop after its lease ended; exiting model=%s", model)
                os._exit(EXIT_STUCK)
        try:
            await lease.release()  # a no-op unless this term still holds it
        except (RedisError, OSError):
            lease.token = None
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            if isinstance(error, Fenced):
                log.warning("term over model=%s holder=%s", model, lease.holder)
            else:
                log.error("batcher failed model=%s error=%r", model, error)
        await asyncio.sleep(period_s)
