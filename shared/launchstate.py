"""What the supervisors publish for the gateway to show: each autoscaler's launcher state per
model (`GET /v1/models/{m}` under `launcher`, and /metrics), the autoscalers alive, and the
restarts of the roles `asyncinfer up` supervises.

Entries of processes that can die without saying goodbye carry their own expiry, like worker
heartbeats: readers skip (and prune) the expired ones.
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


async def model_launchers(redis: aioredis.Redis, model: str) -> list[dict[str, Any]]:
    """Each live autoscaler's launcher state for `model`."""
    return await live(redis, keys.launch_state(model))


async def role_restarts(redis: aioredis.Redis) -> dict[str, int]:
    """Restarts per role of the local stack (empty when not run by `asyncinfer up`)."""
    return {str(k): int(v) for k, v in (await redis.hgetall(keys.restarts())).items()}
