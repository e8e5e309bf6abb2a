"""Long-poll waiters against a real Redis: a fresh job is answered from its final message with no
read, and any doubt (an id-only message, a dropped subscription) falls back to reading."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from gateway.waiters import CompletionWaiters
from shared import keys
from shared.answerleg import AnswerLegs
from shared.jobs import Job
from shared.redisserver import RedisServer
from shared.store import JobStore

RECORD = {"id": "j1", "model": "m", "status": "succeeded", "created_ms": "1763700000000",
          "finished_ms": "1763700000009", "output": '{"y": 1}', "owner": ""}


class Reads:
    """The `fetch` callback, counting its calls; answers a queued job."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> Job:
        self.count += 1
        return JobStore.visible("j1", {**RECORD, "status": "queued", "output": ""}, "")


def build(fields: dict[str, str]) -> Job:
    return JobStore.visible(fields["id"], fields, "")


@pytest.fixture
async def waiters(redis_server: RedisServer) -> AsyncIterator[CompletionWaiters]:
    w = CompletionWaiters(aioredis.Redis.from_url(redis_server.url, decode_responses=True))
    w.start()
    for _ in range(200):  # until the subscription is confirmed
        if w._live:
            break
        await asyncio.sleep(0.01)
    yield w
    await w.stop()


def publish(url: str, message: str) -> None:
    client = redis.Redis.from_url(url)
    client.publish(keys.FINAL_CHANNEL, message)
    client.close()


async def test_a_fresh_job_is_answered_from_its_message_without_a_read(
        waiters: CompletionWaiters, redis_server: RedisServer) -> None:
    waiters.note_submitted(["j1"])
    reads = Reads()
    task = asyncio.create_task(waiters.wait("j1", reads, 10, build))
    await asyncio.sleep(0.05)
    publish(redis_server.url, "j1\n" + json.dumps(RECORD))
    job = await asyncio.wait_for(task, 5)
    assert job.status == "succeeded" and job.output == {"y": 1}
    assert reads.count == 0


async def test_a_fresh_job_finished_before_the_poll_needs_no_read(
        waiters: CompletionWaiters, redis_server: RedisServer) -> None:
    waiters.note_submitted(["j1"])
    publish(redis_server.url, "j1\n" + json.dumps(RECORD))
    await asyncio.sleep(0.1)
    reads = Reads()
    job = await waiters.wait("j1", reads, 10, build)
    assert job.status == "succeeded" and reads.count == 0


async def test_an_id_only_message_makes_the_poll_read(
        waiters: CompletionWaiters, redis_server: RedisServer) -> None:
    waiters.note_submitted(["j1"])
    publish(redis_server.url, "j1")
    await asyncio.sleep(0.1)
    reads = Reads()
    job = await waiters.wait("j1", reads, 0.2, build)
    assert reads.count >= 1 and job.status == "queued"


async def test_a_dropped_subscription_makes_fresh_jobs_read_again(
        waiters: CompletionWaiters, redis_server: RedisServer) -> None:
    waiters.note_submitted(["j1"])
    epoch = waiters._epoch
    admin = redis.Redis.from_url(redis_server.url)
    admin.client_kill_filter(_type="pubsub")
    admin.close()
    for _ in range(300):  # the listener notices and subscribes again
        if waiters._epoch > epoch and waiters._live:
            break
        await asyncio.sleep(0.01)
    assert waiters._epoch > epoch
    reads = Reads()
    await waiters.wait("j1", reads, 0.2, build)
    assert reads.count >= 1  # a message may have been lost while it was down


async def test_a_job_not_submitted_here_is_read_first(waiters: CompletionWaiters) -> None:
    reads = Reads()
    job = await waiters.wait("j1", reads, 0.1, build)
    assert reads.count >= 1 and job.status == "queued"


class Legs(AnswerLegs):
    """Records what the waiters report (the seam is ours)."""

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # never publishes here
        self.seen: list[tuple[str, float, float]] = []

    def observe(self, model: str, finished_ms: float, answered_ms: float) -> None:
        self.seen.append((model, finished_ms, answered_ms))


async def test_only_a_client_that_was_waiting_measures_the_answer_leg(
        redis_server: RedisServer) -> None:
    legs = Legs()
    w = CompletionWaiters(aioredis.Redis.from_url(redis_server.url, decode_responses=True), legs)
    w.start()
    try:
        for _ in range(200):
            if w._live:
                break
            await asyncio.sleep(0.01)
        # Finished before anyone asked (its message was received first): no sample, however
        # recent its finish.
        w.note_submitted(["j1"])
        recent = {**RECORD, "finished_ms": str(int(time.time() * 1000))}
        publish(redis_server.url, "j1\n" + json.dumps(recent))
        for _ in range(100):
            if w._fresh["j1"].record:
                break
            await asyncio.sleep(0.01)
        assert (await w.wait("j1", Reads(), 5, build)).status == "succeeded"
        assert legs.seen == []
        # Finished while its client waited: one sample, final write to answer.
        waiting = asyncio.create_task(w.wait("j2", Reads(), 5, build))
        await asyncio.sleep(0.05)
        finished_ms = int(time.time() * 1000)
        record = {**RECORD, "id": "j2", "finished_ms": str(finished_ms)}
        publish(redis_server.url, "j2\n" + json.dumps(record))
        assert (await waiting).status == "succeeded"
        [(model, finished, answered)] = legs.seen
        assert model == "m" and finished == finished_ms and answered >= finished_ms
    finally:
        await w.stop()
