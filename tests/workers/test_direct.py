"""A lone batch run start to end on the compute thread (workers.direct): what it writes, and
what it hands back to the event loop's path when Redis fails it. A real Redis, the real
runtime, store and model; replies are lost by cutting the connection (`tests.replyloss`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import keys, scripts
from shared.model import ModelContext
from shared.modelspec import ModelSpec
from shared.redisconn import connect, connect_sync
from shared.redisserver import RedisServer
from shared.settings import Settings
from shared.store import JobStore, NewJob
from shared.syncstore import BlockingWrites
from tests.replyloss import ReplyLoss
from tests.workers.test_outage import CONSUMER, MODEL, _held_job, _sha
from workers.direct import DirectPath
from workers.loop import LoopThread
from workers.runtime import STUCK_GRACE_S, BatchRequest, ModelRuntime


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


class Worker:
    """The runtime and direct path of one worker, on a client through `port`; the runtime's
    async client lives on `loop`, as in a worker process."""

    def __init__(self, port: int, loop: LoopThread, timeout_s: float = 60) -> None:
        spec = ModelSpec.model_validate({
            "name": MODEL, "class": "workers.builtin.synthetic:SyntheticModel",
            "params": {"a_s": 0.0, "b_s": 0.0},
            "options": {"max_batch_size": 4, "batch_timeout_s": timeout_s}})
        settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0")
        self.loop = loop
        self.freed: list[tuple[str, str]] = []  # (batch, thread it was freed on)
        self.store = JobStore(connect(settings), result_ttl_s=60, job_ttl_s=60)
        self.runtime = ModelRuntime(
            spec, ModelContext(model=MODEL, worker_index=1, device="cpu", worker_name="w-d"),
            self.store, consumer=CONSUMER,
            lane_free=lambda b: self.freed.append((b, threading.current_thread().name)))
        self.runtime.load()
        self.path = DirectPath(self.runtime, BlockingWrites(self.store, connect_sync(settings)))

    def close(self) -> None:
        self.path.writes.close()
        self.loop.call(self.store.redis.aclose())


@contextlib.asynccontextmanager
async def _losing_reply(port: int, script: str, loop: LoopThread
                        ) -> AsyncIterator[tuple[Worker, ReplyLoss]]:
    """A worker whose connection loses the reply to the first call of `script`."""
    async with ReplyLoss(port) as relay:
        relay.lose_reply_to(_sha(script))
        worker = Worker(relay.port, loop)
        try:
            yield worker, relay
        finally:
            worker.close()


async def _reports(direct: aioredis.Redis, want: int = 1) -> list[dict[str, Any]]:
    """The lane reports, once `want` are there (the loop's path sends its report aside)."""
    for _ in range(200):
        rows: Any = await direct.xrange(keys.completions(MODEL))
        if len(rows) >= want:
            break
        await asyncio.sleep(0.01)
    return [fields for _, fields in rows]


async def test_a_lone_batch_runs_start_to_end_on_the_compute_thread(
        redis_server: RedisServer, direct: aioredis.Redis, loop: LoopThread) -> None:
    job_id = await _held_job(direct)
    worker = Worker(redis_server.port, loop)
    try:
        req = BatchRequest(MODEL, "b-1:batch-1:1", [job_id])
        assert DirectPath.eligible(req, held=0)
        result = await asyncio.wrap_future(worker.path.submit(req))
    finally:
        worker.close()
    assert result.done and result.unwritten is None
    record = await direct.hgetall(keys.job(job_id))
    assert record["status"] == "succeeded" and json.loads(record["output"]) == {"y": 4.0}
    assert record["attempts"] == "1" and json.loads(record["batch_size"]) == 1
    # The lane was freed from the thread that runs the model, and reported with the final write.
    [(batch, thread)] = worker.freed
    assert batch == req.batch_id and thread.startswith("predict")
    [report] = await _reports(direct)
    assert report["batch"] == req.batch_id and report["outcome"] == "ok"
    assert set(json.loads(report["spans"])) == {"preprocess", "predict", "postprocess"}
    assert await direct.xpending(keys.streams(MODEL)[1], keys.BATCHER_GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []}


def test_only_a_lone_plain_batch_of_an_idle_worker_goes_direct() -> None:
    lone = BatchRequest(MODEL, "b", ["j"])
    assert DirectPath.eligible(lone, held=0)
    assert not DirectPath.eligible(lone, held=1)  # another batch is running or waiting
    assert not DirectPath.eligible(BatchRequest(MODEL, "b", ["j", "k"]), held=0)
    assert not DirectPath.eligible(BatchRequest(MODEL, "b", ["j"], solo=True), held=0)


async def test_a_job_that_is_not_to_run_sends_the_batch_to_the_loop(
        redis_server: RedisServer, direct: aioredis.Redis, loop: LoopThread) -> None:
    job_id = await _held_job(direct)
    store = JobStore(direct, result_ttl_s=60, job_ttl_s=60)
    await store.cancel(job_id)
    worker = Worker(redis_server.port, loop)
    try:
        req = BatchRequest(MODEL, "b-1:batch-1:1", [job_id])
        result = await asyncio.wrap_future(worker.path.submit(req))
        assert not result.done and result.unwritten is None
        # The loop's path runs it then: a skipped job, and the lane report says so.
        report = await asyncio.wrap_future(loop.spawn(worker.runtime.run_batch(req)))
        [sent] = await _reports(direct)
    finally:
        worker.close()
    assert report.skipped == 1 and report.ok == 0 and sent["skipped"] == "1"
    assert await direct.hget(keys.job(job_id), "status") == "canceled"


async def test_a_start_whose_reply_is_lost_hands_the_batch_to_the_loop_which_runs_it_once(
        redis_server: RedisServer, direct: aioredis.Redis, loop: LoopThread) -> None:
    job_id = await _held_job(direct)
    async with _losing_reply(redis_server.port, scripts.START, loop) as (worker, relay):
        req = BatchRequest(MODEL, "b-1:batch-1:1", [job_id])
        result = await asyncio.wrap_future(worker.path.submit(req))
        assert not result.done and relay.lost == 1
        # START ran once already; the loop's repeat of it must not count a second attempt.
        report = await asyncio.wrap_future(loop.spawn(worker.runtime.run_batch(req)))
    assert report.ok == 1
    record = await direct.hgetall(keys.job(job_id))
    assert record["status"] == "succeeded" and record["attempts"] == "1"


async def test_a_final_write_whose_reply_is_lost_is_left_to_the_loop_and_written_once(
        redis_server: RedisServer, direct: aioredis.Redis, loop: LoopThread) -> None:
    job_id = await _held_job(direct)
    async with _losing_reply(redis_server.port, scripts.FINISH, loop) as (worker, relay):
        result = await asyncio.wrap_future(worker.path.submit(
            BatchRequest(MODEL, "b-1:batch-1:1", [job_id])))
        assert not result.done and result.unwritten is not None and relay.lost == 1
        outcomes, fields = result.unwritten
        await asyncio.wrap_future(loop.spawn(worker.runtime.finish(outcomes, report=fields)))
    assert await direct.hget(keys.job(job_id), "status") == "succeeded"
    assert await direct.hgetall(keys.stats(MODEL)) == {"succeeded": "1"}  # first write wins


async def _queued(direct: aioredis.Redis, inputs: list[dict[str, Any]]) -> list[str]:
    """Queued jobs whose entries the worker's consumer holds, as after a dispatch."""
    for stream in keys.streams(MODEL):
        with contextlib.suppress(ResponseError):  # the group exists already
            await direct.xgroup_create(stream, keys.BATCHER_GROUP, id="0", mkstream=True)
    store = JobStore(direct, result_ttl_s=60, job_ttl_s=60)
    ids = (await store.submit(MODEL, [NewJob(json.dumps(i)) for i in inputs],
                              max_queue=10)).ids
    await direct.xreadgroup(keys.BATCHER_GROUP, CONSUMER, {s: ">" for s in keys.streams(MODEL)})
    return ids


async def test_a_batch_behind_a_lone_one_on_the_compute_thread_waits_for_a_lane_not_its_limit(
        redis_server: RedisServer, direct: aioredis.Redis, loop: LoopThread) -> None:
    """The direct path holds the compute thread without a permit of the loop's lanes: a batch
    the loop starts meanwhile waits for the thread, and that wait must not count against its
    time limit (it would make the worker exit over a healthy batch)."""
    [slow] = await _queued(direct, [{"x": 1, "sleep_s": 2.5}])
    worker = Worker(redis_server.port, loop, timeout_s=0.2)
    try:
        running = worker.path.submit(BatchRequest(MODEL, "b-1:batch-1:1", [slow]))
        await asyncio.sleep(0.2)  # the slow job's stages are running
        staged = await _queued(direct, [{"x": 2}, {"x": 3}])
        report = await asyncio.wrap_future(loop.spawn(worker.runtime.run_batch(
            BatchRequest(MODEL, "b-1:batch-2:2", staged))))
        assert (await asyncio.wrap_future(running)).done
    finally:
        worker.close()
    assert report.outcome == "ok" and report.ok == 2
    # Its wait for the thread shows as a lane wait, and its predict span as its own predict.
    assert report.lane_wait_ms > 1500 and report.predict_ms < 1000


async def test_a_hanging_lone_batch_is_listed_stuck_once_past_its_limit_and_grace(
        redis_server: RedisServer, direct: aioredis.Redis, loop: LoopThread) -> None:
    """The watchdog's decision, with the clock given: the worker's heartbeat gives up on what
    `stuck` lists (tests/workers/test_workers.py runs that end to end). Only the stages count:
    START and the final write are Redis round trips, and an outage is not a hang."""
    [job_id] = await _queued(direct, [{"x": 1, "sleep_s": 1.0}])
    worker = Worker(redis_server.port, loop, timeout_s=5)
    try:
        req = BatchRequest(MODEL, "b-1:batch-1:1", [job_id])
        limit_s = 5 + STUCK_GRACE_S
        running = worker.path.submit(req)
        await asyncio.sleep(0.3)  # in its stages now
        assert worker.path.stuck(time.monotonic() + limit_s - 0.5) == []
        assert worker.path.stuck(time.monotonic() + limit_s + 0.01) == [req]
        assert worker.path.stuck(time.monotonic() + limit_s + 0.01) == []  # listed once
        assert (await asyncio.wrap_future(running)).done
        assert worker.path.stuck(time.monotonic() + 10 * limit_s) == []  # over: forgotten
    finally:
        worker.close()
