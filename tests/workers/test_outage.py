"""A worker's writes when Redis runs them and the reply is lost (Redis stopped, or the network
broke, in between): the worker cannot tell whether they happened, so it repeats them once Redis
answers, and a repeat must change nothing. A real Redis, the real runtime and store; only the
connection between them is cut (`tests.replyloss`)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared import keys, scripts
from shared.model import ModelContext
from shared.modelspec import ModelSpec
from shared.procs import free_port
from shared.redisconn import connect
from shared.redisserver import RedisServer
from shared.settings import Settings
from shared.store import JobStore, NewJob
from tests.replyloss import ReplyLoss
from workers import runtime as runtime_module
from workers.runtime import BatchRequest, ModelRuntime

MODEL = "synthetic"
CONSUMER = keys.worker_consumer("w-outage")


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


async def _held_job(direct: aioredis.Redis) -> str:
    """A queued job whose stream entry the worker's consumer holds, as after a dispatch."""
    for stream in keys.streams(MODEL):
        await direct.xgroup_create(stream, keys.BATCHER_GROUP, id="0", mkstream=True)
    store = JobStore(direct, result_ttl_s=60, job_ttl_s=60)
    [job_id] = (await store.submit(MODEL, [NewJob(json.dumps({"x": 2}))], max_queue=10)).ids
    await direct.xreadgroup(keys.BATCHER_GROUP, CONSUMER, {s: ">" for s in keys.streams(MODEL)})
    # Loaded beforehand, so the command whose reply is lost is the one that runs the script.
    for script in (scripts.START, scripts.FINISH):
        await direct.script_load(script)
    return job_id


async def _run_losing_one_reply(redis_server: RedisServer, direct: aioredis.Redis,
                                script: str) -> str:
    """Run one held job's batch through the worker's runtime while the reply to the first call
    of `script` is lost; returns the job's id."""
    job_id = await _held_job(direct)
    async with ReplyLoss(redis_server.port) as relay:
        relay.lose_reply_to(_sha(script))
        await _run_through(relay, job_id)
        assert relay.lost == 1
    return job_id


async def _run_through(relay: ReplyLoss, job_id: str) -> None:
    spec = ModelSpec.model_validate({
        "name": MODEL, "class": "workers.builtin.synthetic:SyntheticModel",
        "params": {"a_s": 0.0, "b_s": 0.0}, "options": {"max_batch_size": 4}})
    # The client every process builds (no retry of its own inside redis-py).
    via = connect(Settings(redis_url=f"redis://127.0.0.1:{relay.port}/0"))
    try:
        runtime = ModelRuntime(spec, ModelContext(model=MODEL, worker_index=1, device="cpu",
                                                  worker_name="w-outage"),
                               JobStore(via, result_ttl_s=60, job_ttl_s=60), consumer=CONSUMER)
        runtime.load()
        report = await runtime.run_batch(BatchRequest(MODEL, "b-1:batch-1:1", [job_id]))
        assert report.ok == 1
    finally:
        await via.aclose()


async def test_a_start_whose_reply_is_lost_runs_the_job_once_with_one_attempt(
        redis_server: RedisServer, direct: aioredis.Redis) -> None:
    job_id = await _run_losing_one_reply(redis_server, direct, scripts.START)
    record = await direct.hgetall(keys.job(job_id))
    assert record["status"] == "succeeded" and json.loads(record["output"]) == {"y": 4.0}
    # Given up instead, the job stays 'running' until the batcher takes its entry back as a
    # suspect and runs it again: a second attempt, counted towards poison when run alone.
    assert record["attempts"] == "1"


async def test_a_final_write_whose_reply_is_lost_is_written_once(
        redis_server: RedisServer, direct: aioredis.Redis) -> None:
    job_id = await _run_losing_one_reply(redis_server, direct, scripts.FINISH)
    assert await direct.hget(keys.job(job_id), "status") == "succeeded"
    assert await direct.hgetall(keys.stats(MODEL)) == {"succeeded": "1"}  # first write wins
    assert await direct.xpending(keys.streams(MODEL)[1], keys.BATCHER_GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []}


async def test_a_start_through_an_outage_gives_the_batch_up_and_is_never_taken_for_a_hang(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker bounds a batch with `outer_limit_s` and exits past it as stuck (failing a
    lone suspect as `timeout`); a start riding out an outage must give up first. The retry
    window is shortened here only to keep the test short: the limit is built from it."""
    monkeypatch.setattr(runtime_module, "OUTAGE_RETRY_S", 1.0)
    spec = ModelSpec.model_validate({
        "name": MODEL, "class": "workers.builtin.synthetic:SyntheticModel",
        "options": {"max_batch_size": 4, "batch_timeout_s": 0.1}})
    down = connect(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # nobody listens
    try:
        runtime = ModelRuntime(spec, ModelContext(model=MODEL, worker_index=1, device="cpu",
                                                  worker_name="w-outage"),
                               JobStore(down, result_ttl_s=60, job_ttl_s=60), consumer=CONSUMER)
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(
                runtime.run_batch(BatchRequest(MODEL, "b-1:batch-1:1", ["j"], solo=True)),
                runtime.outer_limit_s())
    finally:
        await down.aclose()
