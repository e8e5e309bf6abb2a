"""The answer leg as gateways publish it and the batcher reads it, against a real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from shared import expiring, keys
from shared.answerleg import MAX_SAMPLE_MS, AnswerLegs, answer_leg_s
from shared.redisserver import RedisServer


def test_the_published_figure_is_the_99th_percentile_of_the_window() -> None:
    legs = AnswerLegs(None)  # type: ignore[arg-type]  # no Redis needed to measure
    assert legs.high_ms("m") is None
    for leg_ms in range(1, 101):  # 1..100 ms
        legs.observe("m", 1_000.0, 1_000.0 + leg_ms)
    assert legs.high_ms("m") == 100
    for leg_ms in range(1, 201):  # a full window of 200: 1..200 ms
        legs.observe("m", 1_000.0, 1_000.0 + leg_ms)
    assert legs.high_ms("m") == 199
    # A negative leg (clock step) or a stalled client is no sample of this leg.
    legs.observe("other", 1_000.0, 999.0)
    legs.observe("other", 1_000.0, 1_000.0 + MAX_SAMPLE_MS + 1)
    assert legs.high_ms("other") is None


async def test_the_batcher_reads_the_slowest_live_gateway(redis_server: RedisServer) -> None:
    r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await r.delete(keys.answer_leg("m"))
        assert await answer_leg_s(r, "m") == 0.0  # nobody measured: nothing to add
        fast, slow = AnswerLegs(r), AnswerLegs(r)
        fast.observe("m", 0, 2.0)
        slow.observe("m", 0, 7.5)
        await fast.publish()
        await slow.publish()
        assert await answer_leg_s(r, "m") == 0.0075
        # A gateway that died without withdrawing: its entry lapses and no longer counts.
        await expiring.put(r, keys.answer_leg("m"), "dead", {"p99_ms": 500.0}, ttl_s=-1)
        assert await answer_leg_s(r, "m") == 0.0075
        assert "dead" not in await r.hgetall(keys.answer_leg("m"))
        # Nothing new measured: nothing rewritten.
        await r.delete(keys.answer_leg("m"))
        await slow.publish()
        assert await r.exists(keys.answer_leg("m")) == 0
        fast.observe("m", 0, 3.0)
        await fast.publish()
        await slow.stop()
        await fast.stop()  # withdraws its entry
        assert await answer_leg_s(r, "m") == 0.0
    finally:
        await r.aclose()
