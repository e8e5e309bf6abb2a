"""Worker heartbeats in Redis: what the batcher counts as capacity and the autoscaler as replicas.

Each worker owns one field of the model's `workers` hash; the value carries its own expiry time,
so readers skip (and prune) the fields of workers that died without saying goodbye.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.expiring import live

log = logging.getLogger(__name__)

State = Literal["starting", "ready", "busy", "draining"]
SERVING_STATES = ("ready", "busy")


def worker_name(model: str, index: int, device_slug: str, host: str) -> str:
    """`{model}-{index}-{device}@{host}`, e.g. `mlp-1-cuda3@gpu-box`: unique across hosts (the
    host), across models and indexes, and across two autoscalers on one host (each owns its
    own devices). Celery's node name and the key of the worker's heartbeat."""
    return f"{model}-{index}-{device_slug}@{host}"


@dataclass
class Heartbeat:
    name: str
    model: str
    index: int
    device: str  # the host's device label: cpu:1, cuda:3, cuda:0:mig1
    slots: int
    device_uuid: str = ""  # GPU-... or MIG-... on a GPU
    torch_uuid: str = ""  # the UUID torch reports for cuda:0 inside the worker (a GPU check)
    state: State = "starting"
    busy: int = 0
    pid: int = 0
    host: str = ""
    cores: list[int] = field(default_factory=list)
    expires_ms: int = 0


async def live_workers(redis: aioredis.Redis, model: str) -> list[dict[str, Any]]:
    """Heartbeats of the model's workers that are alive now; prunes the expired ones."""
    return await live(redis, keys.workers(model))


class HeartbeatPublisher:
    """Publishes this worker's heartbeat every interval until stopped."""

    def __init__(self, redis: aioredis.Redis, hb: Heartbeat, interval_s: float) -> None:
        self.redis = redis
        self.hb = hb
        self.interval_s = interval_s
        self.hb.pid = os.getpid()
        self.hb.host = socket.gethostname()
        if not self.hb.cores and hasattr(os, "sched_getaffinity"):
            # No compute core given (a GPU worker): the cores the process may use.
            self.hb.cores = sorted(os.sched_getaffinity(0))

    async def publish(self) -> None:
        self.hb.expires_ms = int((time.time() + self.interval_s * keys.HEARTBEAT_TTL_FACTOR)
                                 * 1000)
        await self.redis.hset(keys.workers(self.hb.model), self.hb.name,
                              json.dumps(asdict(self.hb)))

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self.publish()
                if failing:
                    log.info("heartbeat restored worker=%s", self.hb.name)
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("heartbeat failing worker=%s error=%s", self.hb.name, exc)
                failing = True
            await asyncio.sleep(self.interval_s)

    async def remove(self) -> None:
        await self.redis.hdel(keys.workers(self.hb.model), self.hb.name)
