"""Worker heartbeats in Redis: what the batcher counts as capacity and the autoscaler as replicas.

Each worker owns one field of the model's `workers` hash (its record, for display and scaling)
and one liveness key (`keys.alive`) that expires `heartbeat_lapse_s` after its last beat. The key
decides life and death, on the Redis server's clock, so hosts with skewed clocks agree; records
whose key is gone are pruned. Once the worker serves, its beats come from the Celery consumer's
own event loop (see `workers.liveness`): a worker whose consumer hangs stops beating and is dead
to the batcher, which then runs its batches elsewhere.
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
    name: str  # this process's identity: `base` and a token new at every start
    model: str
    index: int
    device: str  # the host's device label: cpu:1, cuda:3, cuda:0:mig1
    lanes: int  # predicts that run at once (predict_concurrency)
    device_uuid: str = ""  # GPU-... or MIG-... on a GPU
    torch_uuid: str = ""  # the UUID torch reports for cuda:0 inside the worker (a GPU check)
    base: str = ""  # the stable name its launcher knows it by (`worker_name`)
    state: State = "starting"
    busy: int = 0  # batches it holds
    batches: list[str] = field(default_factory=list)  # those whose predict is not over
    beat: int = 0  # counts this worker's heartbeats (a batcher compares two of them)
    pid: int = 0
    host: str = ""
    cores: list[int] = field(default_factory=list)
    expires_ms: int = 0


async def live_workers(redis: aioredis.Redis, model: str) -> list[dict[str, Any]]:
    """Records of the model's workers that are alive now; prunes those of dead ones."""
    raw = await redis.hgetall(keys.workers(model))
    if not raw:
        return []
    names = [str(n) for n in raw]
    flags = await redis.mget([keys.alive(model, n) for n in names])
    now_ms = time.time() * 1000
    alive: list[dict[str, Any]] = []
    dead: list[str] = []
    for name, flag in zip(names, flags, strict=True):
        hb = json.loads(raw[name])
        if flag is not None:
            alive.append(hb)
        elif hb.get("expires_ms", 0) < now_ms:
            dead.append(name)
    if dead:
        await redis.hdel(keys.workers(model), *dead)
    return alive


class HeartbeatPublisher:
    """Publishes this worker's heartbeat every interval until stopped."""

    def __init__(self, redis: aioredis.Redis, hb: Heartbeat, interval_s: float,
                 lapse_s: float) -> None:
        self.redis = redis
        self.hb = hb
        self.interval_s = interval_s
        self.lapse_ms = max(1, int(lapse_s * 1000))
        self.hb.pid = os.getpid()
        self.hb.host = socket.gethostname()
        if not self.hb.cores and hasattr(os, "sched_getaffinity"):
            # No compute core given (a GPU worker): the cores the process may use.
            self.hb.cores = sorted(os.sched_getaffinity(0))

    async def publish(self) -> None:
        """One beat: the record and the liveness key, one round trip."""
        self.hb.beat += 1
        self.hb.expires_ms = int(time.time() * 1000 + self.lapse_ms * keys.HEARTBEAT_RECORD_FACTOR)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(keys.workers(self.hb.model), self.hb.name, json.dumps(asdict(self.hb)))
        pipe.set(keys.alive(self.hb.model, self.hb.name), self.hb.state, px=self.lapse_ms)
        await pipe.execute()

    async def run(self) -> None:
        """Beat every interval until cancelled (while the model loads, before Celery runs)."""
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
        """Say goodbye: the batcher sees the death at once instead of after the lapse."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.alive(self.hb.model, self.hb.name))
        pipe.hdel(keys.workers(self.hb.model), self.hb.name)
        await pipe.execute()
