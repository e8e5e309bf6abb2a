"""One active batcher per model: a Redis lease with a fencing check on every renewal.

A standby batcher retries the lease; when the holder dies the lease expires within
`lease_ttl_s` and the standby takes over (and, with it, the dead holder's entries).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys

log = logging.getLogger(__name__)

# Renew only if we still hold it; never extend someone else's lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    def __init__(self, redis: aioredis.Redis, model: str, holder: str, ttl_s: float) -> None:
        self.redis = redis
        self.key = keys.lease(model)
        self.holder = holder
        self.ttl_ms = int(ttl_s * 1000)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.holder])


async def serve_while_leader(lease: Lease, serve: Callable[[], Coroutine[Any, Any, None]],
                             model: str) -> None:
    """Forever: wait for the lease, run `serve` while renewals succeed, stop it when one fails."""
    period_s = lease.ttl_ms / 3000
    while True:
        try:
            got = await lease.acquire()
        except (RedisError, OSError) as exc:
            log.warning("lease unreachable model=%s error=%s", model, exc)
            got = False
        if not got:
            await asyncio.sleep(period_s)
            continue
        log.info("leader model=%s holder=%s", model, lease.holder)
        task: asyncio.Task[None] = asyncio.create_task(serve(), name=f"serve:{model}")
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=period_s)
                if done:
                    break
                try:
                    held = await lease.renew()
                except (RedisError, OSError):
                    held = False
                if not held:
                    log.warning("lease lost model=%s holder=%s", model, lease.holder)
                    break
        finally:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            if not done:  # stuck in an uncancellable read: leave it, serve a fresh one
                log.error("batcher did not stop after cancel model=%s", model)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("batcher failed model=%s error=%r", model, task.exception())
        await asyncio.sleep(period_s)
