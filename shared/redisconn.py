"""Redis clients built the same way everywhere: explicit timeouts, decoded replies."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.settings import Settings


def connect(settings: Settings, *, block_s: float = 0.0) -> aioredis.Redis:
    """An asyncio client. `block_s` is the longest BLOCK this client will issue: the socket
    timeout must exceed it (redis-py 8 defaults to 5 s and retries, turning a quiet stream into
    a minute-long hang)."""
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s + block_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=15,
        retry_on_timeout=False,
    )
