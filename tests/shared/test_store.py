"""The job store's scripts against a real Redis: what each transition leaves behind and what it
costs in commands (every command inside a script is work for the single Redis thread)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.settings import Settings
from shared.store import JobStore, NewJob, Outcome

MODEL = "m"


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def _calls(redis: aioredis.Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_a_due_set_expires_after_its_last_job_and_is_not_extended_on_every_submit(
        redis: aioredis.Redis) -> None:
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    await store.submit(MODEL, [NewJob(json.dumps({"x": 1}), ttl_s=30)], max_queue=100)
    normal, high = keys.due(MODEL, "normal"), keys.due(MODEL, "high")
    ttl_ms = await redis.pttl(normal)
    assert 30_000 < ttl_ms <= 30_000 + keys.DUE_SLACK_MS
    assert await redis.exists(high) == 0  # untouched sets are left alone
    await redis.config_resetstat()
    await store.submit(MODEL, [NewJob(json.dumps({"x": 2}), ttl_s=30)], max_queue=100)
    calls = await _calls(redis)
    # The job's own key gets its expiry; the due set's, set a moment ago with its slack, stands.
    assert calls.get("pexpireat") == 1, calls
    assert calls.get("pttl") == 1, calls
    # A job that outlives the set's expiry extends it.
    await store.submit(MODEL, [NewJob(json.dumps({"x": 3}), ttl_s=600)], max_queue=100)
    assert await redis.pttl(normal) > 600_000


async def test_a_started_job_leaves_its_due_set_once(redis: aioredis.Redis) -> None:
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    done = await store.submit(MODEL, [NewJob(json.dumps({"x": 1}))], max_queue=100)
    [job_id] = done.ids
    normal = keys.due(MODEL, "normal")
    assert await redis.zscore(normal, job_id) is not None
    # Started by hand (no stream entry held by a consumer is needed for the due set).
    await redis.hset(keys.job(job_id), "status", "running")
    await redis.zrem(normal, job_id)
    await redis.config_resetstat()
    await store.finish([Outcome(job_id, "succeeded", output_json='{"y": 1}')])
    calls = await _calls(redis)
    assert "zrem" not in calls, calls  # START already took it out
    assert (await store.get(job_id)).status == "succeeded"
    # A job finished while still queued (shed, expired by the batcher) does leave the set.
    done = await store.submit(MODEL, [NewJob(json.dumps({"x": 2}))], max_queue=100)
    await store.finish([Outcome(done.ids[0], "expired", error={"type": "expired"})])
    assert await redis.zscore(normal, done.ids[0]) is None


async def test_a_lone_jobs_final_write_and_lane_report_are_one_round_trip(
        redis: aioredis.Redis) -> None:
    """No SCRIPT EXISTS before it (redis-py sends one for a Script queued in a pipeline), and a
    Redis that lost its script cache (a restart) still gets the write, and the report once."""
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    report = (keys.completions(MODEL), {"batch": "b1"})
    await store.finish([Outcome("warm", "succeeded", output_json="1")])  # the script loaded
    for flushed in (False, True):
        done = await store.submit(MODEL, [NewJob(json.dumps({"x": 1}))], max_queue=100)
        [job_id] = done.ids
        await redis.delete(keys.completions(MODEL))
        if flushed:
            await redis.script_flush()
        await redis.config_resetstat()
        stuck = await store.finish([Outcome(job_id, "succeeded", output_json='{"y": 1}')],
                                   report=report)
        assert stuck == [True]
        calls = await _calls(redis)
        assert "script|exists" not in calls, calls
        assert calls.get("xadd") == 1, calls  # the report, never twice
        if not flushed:  # one EVALSHA, nothing loaded
            assert calls.get("evalsha") == 1 and "script|load" not in calls, calls
        assert (await redis.hget(keys.job(job_id), "status")) == "succeeded"
        assert await redis.xlen(keys.completions(MODEL)) == 1
