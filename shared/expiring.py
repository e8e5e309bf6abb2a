"""Hash entries that carry their own expiry time, for state published by processes that can die
without saying goodbye (worker heartbeats, autoscalers and their launchers): readers skip, and
prune, the entries whose time has passed. A hash field cannot expire by itself in Redis 7.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from shared import keys


async def put(redis: aioredis.Redis, key: str, field: str, value: dict[str, Any],
              ttl_s: float = keys.LAUNCH_STATE_TTL_S) -> None:
    """Write one expiring entry of the hash `key`."""
    entry = {**value, "expires_ms": int((time.time() + ttl_s) * 1000)}
    await redis.hset(key, field, json.dumps(entry))


async def live(redis: aioredis.Redis, key: str) -> list[dict[str, Any]]:
    """The unexpired entries of the hash `key`; prunes the expired ones."""
    raw = await redis.hgetall(key)
    now_ms = time.time() * 1000
    alive: list[dict[str, Any]] = []
    dead: list[str] = []
    for field, value in raw.items():
        entry = json.loads(value)
        if entry.get("expires_ms", 0) > now_ms:
            alive.append(entry)
        else:
            dead.append(str(field))
    if dead:
        await redis.hdel(key, *dead)
    return alive
