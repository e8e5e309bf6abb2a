"""Worker claims in a real Redis: the shared count that keeps autoscalers on several hosts
within one model's desired number, even when they claim at the same instant."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from shared import keys
from shared.redisserver import RedisServer
from workers.claims import Claims


async def test_concurrent_claims_never_exceed_the_desired_count(
        redis_server: RedisServer) -> None:
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await redis.delete(keys.worker_claims("m"))
        hosts = [Claims(redis) for _ in range(4)]
        # Four autoscalers, each wanting 3 workers at once, desired 3 for all of them.
        got = await asyncio.gather(*(c.claim("m", f"m-{i}-cpu0@host{h}", 3)
                                     for h, c in enumerate(hosts) for i in range(1, 4)))
        assert sum(got) == 3
        live = await hosts[0].refresh("m", [])
        assert len(live) == 3
        # Re-claiming one's own name does not count it twice.
        assert await hosts[0].claim("m", live[0], 3)
        assert len(await hosts[0].refresh("m", [])) == 3
        # Two hosts see the same lull: only one gives a slot back per step.
        released = await asyncio.gather(*(hosts[0].release_above("m", name, 2)
                                          for name in live[:2]))
        assert sorted(released) == [False, True]
        assert len(await hosts[0].refresh("m", [])) == 2
    finally:
        await redis.aclose()


async def test_claims_of_a_dead_autoscaler_expire(redis_server: RedisServer) -> None:
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await redis.delete(keys.worker_claims("m"))
        alive, dead = Claims(redis, ttl_s=30), Claims(redis, ttl_s=0.2)
        assert await alive.claim("m", "a", 2)
        assert await dead.claim("m", "b", 2)
        assert not await alive.claim("m", "c", 2)
        await asyncio.sleep(0.3)  # the Redis clock, not a timing assertion
        assert await alive.refresh("m", ["a"]) == ["a"]
        assert await alive.claim("m", "c", 2)
    finally:
        await redis.aclose()


async def test_a_draining_worker_holds_its_slot_until_its_process_exits(
        redis_server: RedisServer) -> None:
    """Scale-down on one host while another scales up: the worker finishing its last batches
    still runs, so its slot is not free for a new worker elsewhere until it has exited (the
    two-host test saw 4 processes for a max of 3 when the slot was given back at SIGTERM)."""
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await redis.delete(keys.worker_claims("m"))
        a, b = Claims(redis), Claims(redis)
        assert await a.claim("m", "a1", 2) and await b.claim("m", "b1", 2)
        # Host a sees a lull (desired 1): a1 drains; it no longer serves...
        assert await a.release_above("m", "a1", 1)
        assert await a.refresh("m", [], draining=["a1"]) == ["b1"]
        # ...and host b, seeing the lull too, keeps b1: one worker less, not two.
        assert not await b.release_above("m", "b1", 1)
        # Load is back (desired 2): no new worker while a1's process still runs.
        assert not await b.claim("m", "b2", 2)
        await a.release("m", "a1")  # a's launcher reaped the exited process
        assert await b.claim("m", "b2", 2)
        assert sorted(await b.refresh("m", [])) == ["b1", "b2"]
    finally:
        await redis.aclose()
