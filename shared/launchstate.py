"""What the supervisors publish for the gateway to show: each autoscaler's launcher state per
model (`GET /v1/models/{m}` under `launcher`, and /metrics), the autoscalers alive, and the
restarts of the roles `asyncinfer up` supervises.

Entries of processes that can die without saying goodbye carry their own expiry
(shared.expiring), like worker heartbeats.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from shared import keys
from shared.expiring import live


async def model_launchers(redis: aioredis.Redis, model: str) -> list[dict[str, Any]]:
    """Each live autoscaler's launcher state for `model`."""
    return await live(redis, keys.launch_state(model))


async def role_restarts(redis: aioredis.Redis) -> dict[str, int]:
    """Restarts per role of the local stack (empty when not run by `asyncinfer up`)."""
    return {str(k): int(v) for k, v in (await redis.hgetall(keys.restarts())).items()}
