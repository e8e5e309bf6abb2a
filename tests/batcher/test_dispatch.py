"""The fenced writes against a real Redis: lease epochs, atomic dispatch, takeover, refresh,
and the worker's START refusing a batch it no longer owns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from celery import Celery

from batcher.__main__ import cork_policy
from batcher.dispatch import Dispatcher
from batcher.lease import Lease
from batcher.service import ModelBatcher
from batcher.streams import Entry, ModelStreams
from shared import keys
from shared.celeryapp import BATCH_TASK, make_celery
from shared.errors import Fenced
from shared.modelspec import load_specs
from shared.settings import Settings
from shared.store import JobStore, NewJob, Outcome
from workers.refresh import HeldEntries

MODEL = "m"
STALE_MS = 6000


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def celery(settings: Settings) -> Celery:
    return make_celery(settings)


async def _setup(redis: aioredis.Redis, celery: Celery, jobs: int,
                 holder: str = "b-one") -> tuple[Lease, ModelStreams, Dispatcher, list[Entry]]:
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    lease = Lease(redis, MODEL, holder, ttl_s=5)
    assert await lease.acquire()
    streams = ModelStreams(redis, MODEL, holder)
    await streams.ensure_groups()
    await store.submit(MODEL, [NewJob(json.dumps({"x": i})) for i in range(jobs)],
                       max_queue=1000)
    entries = await streams.read(count=100, block_ms=100)
    assert len(entries) == jobs
    return lease, streams, Dispatcher(redis, streams, celery, lease, STALE_MS), entries


async def _owners(redis: aioredis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for stream in keys.streams(MODEL):
        for c in await redis.xinfo_consumers(stream, keys.BATCHER_GROUP):
            out[c["name"]] = out.get(c["name"], 0) + int(c["pending"])
    return out


async def test_each_term_has_a_new_epoch_and_an_old_token_renews_nothing(
        redis: aioredis.Redis) -> None:
    first = Lease(redis, MODEL, "b-one", ttl_s=5)
    second = Lease(redis, MODEL, "b-two", ttl_s=5)
    assert await first.acquire() and first.token == "b-one/1"
    assert not await second.acquire()
    await redis.delete(keys.lease(MODEL))  # the term ran out
    assert await second.acquire() and second.token == "b-two/2"
    assert not await first.renew() and first.token is None
    assert await second.renew()


async def test_dispatch_moves_the_entries_and_pushes_the_task_in_one_step(
        redis: aioredis.Redis, celery: Celery) -> None:
    _, _, dispatcher, entries = await _setup(redis, celery, 3)
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    await store.cancel(entries[1].job_id)  # acked and deleted: it must not be sent
    held = await dispatcher.send("w1", "batch-1", entries)
    assert held == {entries[0].key, entries[2].key}
    assert await _owners(redis) == {"b-one": 0, keys.worker_consumer("w1"): 2}
    [raw] = await redis.lrange(keys.worker_queue(MODEL, "w1"), 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == BATCH_TASK
    assert message["properties"]["delivery_info"]["routing_key"] == keys.worker_queue(MODEL,
                                                                                       "w1")


async def test_a_dispatch_whose_reply_was_lost_is_not_repeated_to_another_worker(
        redis: aioredis.Redis, celery: Celery) -> None:
    _, _, dispatcher, entries = await _setup(redis, celery, 2)
    await dispatcher.send("w1", "b1", entries)  # ran; say its reply never came back
    assert await dispatcher.send("w2", "b2", entries) == set()  # nothing stolen from w1
    assert await redis.llen(keys.worker_queue(MODEL, "w2")) == 0
    assert await _owners(redis) == {"b-one": 0, "w:w1": 2}


async def test_a_batcher_whose_term_ended_cannot_dispatch_or_take_over(
        redis: aioredis.Redis, celery: Celery) -> None:
    _, _, dispatcher, entries = await _setup(redis, celery, 2)
    await redis.delete(keys.lease(MODEL))
    successor = Lease(redis, MODEL, "b-two", ttl_s=5)
    assert await successor.acquire()
    with pytest.raises(Fenced):
        await dispatcher.send("w1", "batch-1", entries)
    with pytest.raises(Fenced):
        await dispatcher.takeover()
    assert await redis.llen(keys.worker_queue(MODEL, "w1")) == 0
    assert await _owners(redis) == {"b-one": 2}


async def test_takeover_claims_what_nobody_alive_holds_and_deletes_gone_consumers(
        redis: aioredis.Redis, celery: Celery) -> None:
    _, _, old, entries = await _setup(redis, celery, 6, holder="b-old")
    await old.send("dead", "b1", entries[0:2])
    await old.send("alive", "b2", entries[2:4])
    await old.send("alive", "b3", entries[4:5])
    # entries[5] stays with the old batcher. The live worker beats; b3 it stopped refreshing.
    await redis.set(keys.alive(MODEL, "alive"), "ready", px=3000)
    s = entries[4].stream
    await redis.xclaim(s, keys.BATCHER_GROUP, keys.worker_consumer("alive"), 0,
                       [entries[4].entry_id], idle=STALE_MS + 1, justid=True)
    await redis.delete(keys.lease(MODEL))
    lease = Lease(redis, MODEL, "b-new", ttl_s=5)
    assert await lease.acquire()
    streams = ModelStreams(redis, MODEL, "b-new")
    claimed = await Dispatcher(redis, streams, celery, lease, STALE_MS).takeover()
    got = {c.entry.key: c.former for c in claimed}
    assert got == {entries[0].key: "w:dead", entries[1].key: "w:dead",
                   entries[4].key: "w:alive", entries[5].key: "b-old"}
    assert await _owners(redis) == {"b-new": 4, "w:alive": 2}  # gone consumers deleted


async def test_refresh_keeps_owned_entries_fresh_and_never_takes_one_back(
        redis: aioredis.Redis, celery: Celery) -> None:
    _, _, dispatcher, entries = await _setup(redis, celery, 2)
    await dispatcher.send("w1", "b1", entries)
    held = HeldEntries(redis, MODEL, keys.worker_consumer("w1"))
    held.add("b1", [f"{e.priority}/{e.entry_id}" for e in entries])
    s = entries[0].stream
    for e in entries:
        await redis.xclaim(s, keys.BATCHER_GROUP, "w:w1", 0, [e.entry_id], idle=50_000,
                           justid=True)
    # The second entry was taken back meanwhile (the worker was presumed dead).
    await redis.xclaim(s, keys.BATCHER_GROUP, "b-one", 0, [entries[1].entry_id], justid=True)
    await held.refresh()
    pending = {p["message_id"]: p for p in await redis.xpending_range(
        s, keys.BATCHER_GROUP, "-", "+", 10)}
    assert pending[entries[0].entry_id]["consumer"] == "w:w1"
    assert int(pending[entries[0].entry_id]["time_since_delivered"]) < 5000
    assert pending[entries[1].entry_id]["consumer"] == "b-one"


async def test_start_refuses_jobs_whose_entries_the_worker_no_longer_owns(
        redis: aioredis.Redis, celery: Celery) -> None:
    _, _, dispatcher, entries = await _setup(redis, celery, 2)
    await dispatcher.send("w1", "b1", entries)
    # Taken back (w1 was presumed dead) and sent on: w1 must not run it.
    await redis.xclaim(entries[1].stream, keys.BATCHER_GROUP, "b-one", 0,
                       [entries[1].entry_id], justid=True)
    assert await dispatcher.send("w2", "b2", entries[1:]) == {entries[1].key}
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    started = await store.start([e.job_id for e in entries], "w1", "cpu:0",
                                consumer=keys.worker_consumer("w1"))
    assert [s.verdict for s in started] == ["run", "moved"]


async def test_a_start_repeated_for_its_batch_is_no_new_attempt_and_a_new_batch_is(
        redis: aioredis.Redis, celery: Celery) -> None:
    _, _, dispatcher, entries = await _setup(redis, celery, 1)
    await dispatcher.send("w1", "b1", entries)
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    ids = [entries[0].job_id]

    async def attempts(batch_id: str) -> list[tuple[str, int]]:
        started = await store.start(ids, "w1", "cpu:0", consumer=keys.worker_consumer("w1"),
                                    batch_id=batch_id)
        return [(s.verdict, s.attempts) for s in started]

    assert await attempts("b1") == [("run", 1)]
    assert await attempts("b1") == [("run", 1)]  # the first reply was lost: a repeat
    # Sent again in another batch (taken back from this worker, then dispatched to it): a rerun.
    assert await attempts("b2") == [("run", 2)]
    # A repeat of a run alone counts no second lone run either.
    for _ in range(2):
        await store.start(ids, "w1", "cpu:0", consumer=keys.worker_consumer("w1"), solo=True,
                          batch_id="b3")
    assert await redis.hget(keys.job(ids[0]), "solo") == "1"
    # Taken back and sent to another worker: the old worker's repeat is refused.
    await redis.xclaim(entries[0].stream, keys.BATCHER_GROUP, "b-one", 0,
                       [entries[0].entry_id], justid=True)
    assert await dispatcher.send("w2", "b4", entries) == {entries[0].key}
    started = await store.start(ids, "w1", "cpu:0", consumer=keys.worker_consumer("w1"),
                                batch_id="b3")
    assert [s.verdict for s in started] == ["moved"]


async def test_a_batcher_that_wins_its_model_again_never_repeats_a_batch_id(
        redis: aioredis.Redis, celery: Celery, settings: Settings) -> None:
    """A worker takes a repeated batch id for a repeat of the same START (not an attempt): the
    same process in a new term counts its batches from 1 again, under a new prefix."""
    spec = load_specs(settings.models)["synthetic"]
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    ids = []
    for _ in range(2):
        lease = Lease(redis, spec.name, "b-one", ttl_s=5)
        assert await lease.acquire()
        batcher = ModelBatcher(settings, spec, redis, redis, celery, store, cork_policy, "b-one",
                               lease)
        ids.append(batcher._new_batch_id("batch"))
        await lease.release()
    assert ids[0] != ids[1], ids


async def test_a_fenced_batcher_cannot_finish_jobs(redis: aioredis.Redis, celery: Celery) -> None:
    lease, _, _, entries = await _setup(redis, celery, 1)
    store = JobStore(redis, result_ttl_s=60, job_ttl_s=60)
    token = lease.token
    assert token is not None
    await redis.delete(keys.lease(MODEL))
    assert await Lease(redis, MODEL, "b-two", ttl_s=5).acquire()
    expired = Outcome(entries[0].job_id, "expired", error={"type": "expired", "message": "x"})
    with pytest.raises(Fenced):
        await store.finish([expired], fence=(keys.lease(MODEL), token))
    assert await redis.hget(keys.job(entries[0].job_id), "status") == "queued"
