"""Redis clients built the same way everywhere: explicit timeouts, decoded replies, a blocking
pool (redis-py 8 fails fast past 100 connections; under a burst a caller should queue for a
connection for a bounded time, not get an error)."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.settings import Settings

MAX_CONNECTIONS = 512


def connect(settings: Settings, *, block_s: float = 0.0) -> aioredis.Redis:
    """An asyncio client. `block_s` is the longest BLOCK this client will issue: the socket
    timeout must exceed it (redis-py 8 defaults to 5 s and retries, turning a quiet stream into
    a minute-long hang)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=MAX_CONNECTIONS,
        timeout=settings.redis_timeout_s,
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s + block_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=15,
        retry_on_timeout=False,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it
