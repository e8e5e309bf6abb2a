"""Backpressure, idempotency, API keys and record lifetimes against the real app and Redis."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest
import redis

from gateway.app import create_app
from shared import keys
from shared.redisconn import connect
from shared.settings import Settings
from shared.store import JobStore


@pytest.fixture
async def keyed(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    digests = [hashlib.sha256(k.encode()).hexdigest() for k in ("alpha-key", "beta-key")]
    app = create_app(settings.model_copy(update={"api_keys": digests}))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_api_keys_401_without_or_with_a_wrong_key(keyed: httpx.AsyncClient) -> None:
    for headers in ({}, _auth("nope"), {"Authorization": "Basic abc"}):
        r = await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                             headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized"
    assert (await keyed.get("/v1/models", headers={})).status_code == 401
    # Liveness and metrics stay open on purpose (probes and scrapers carry no key).
    assert (await keyed.get("/healthz")).status_code == 200
    assert (await keyed.get("/metrics")).status_code == 200


async def test_a_job_of_another_key_is_404(keyed: httpx.AsyncClient) -> None:
    r = await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                         headers=_auth("alpha-key"))
    assert r.status_code == 202
    job_id = r.json()["id"]
    assert (await keyed.get(f"/v1/jobs/{job_id}", headers=_auth("alpha-key"))).status_code == 200
    assert (await keyed.get(f"/v1/jobs/{job_id}", headers=_auth("beta-key"))).status_code == 404
    assert (await keyed.delete(f"/v1/jobs/{job_id}",
                               headers=_auth("beta-key"))).status_code == 404


async def test_idempotency_key_replays_and_conflicts(keyed: httpx.AsyncClient) -> None:
    body = {"input": {"x": 7}}
    h = {**_auth("alpha-key"), "Idempotency-Key": "order-42"}
    first = await keyed.post("/v1/models/synthetic/jobs", json=body, headers=h)
    again = await keyed.post("/v1/models/synthetic/jobs", json=body, headers=h)
    assert first.status_code == 202 and again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 8}}, headers=h)
    assert other.status_code == 409 and other.json()["error"]["type"] == "conflict"
    # The same key under another API key is another namespace.
    theirs = await keyed.post("/v1/models/synthetic/jobs", json=body,
                              headers={**_auth("beta-key"), "Idempotency-Key": "order-42"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


async def test_backlog_over_max_queue_is_429_with_retry_after(client: httpx.AsyncClient,
                                                              settings: Settings) -> None:
    # tests/models.toml sets max_queue = 500 for the synthetic model.
    r = await client.post("/v1/models/synthetic/jobs:batch",
                          json={"inputs": [{"x": i} for i in range(500)]})
    assert r.status_code == 202
    full = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    assert full.status_code == 429
    assert int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["type"] == "queue_full"
    # The refused job left nothing behind.
    assert redis.Redis.from_url(settings.redis_url).xlen(keys.stream("synthetic", "normal")) \
        == 500


async def test_retry_after_follows_the_drain_rate(client: httpx.AsyncClient,
                                                  settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    await client.post("/v1/models/synthetic/jobs:batch",
                      json={"inputs": [{"x": i} for i in range(500)]})
    # The batcher publishes its drain rate; 10 rows/s against a backlog of 500 - 250 allowed.
    r.set(keys.batcher_state("synthetic"), '{"drain_rows_per_s": 10.0}')
    full = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    assert full.status_code == 429 and full.headers["retry-after"] == "25"


async def test_records_carry_their_lifetimes(client: httpx.AsyncClient,
                                             settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    job = (await client.post("/v1/models/synthetic/jobs",
                             json={"input": {"x": 1}, "ttl_s": 60})).json()
    ttl_ms = r.pttl(keys.job(job["id"]))
    # A queued record lives for its ttl plus the result lifetime, never forever.
    assert 0 < ttl_ms <= (60 + settings.result_ttl_s) * 1000
    await client.delete(f"/v1/jobs/{job['id']}")
    assert 0 < r.pttl(keys.job(job["id"])) <= keys.CANCELED_TTL_S * 1000


async def test_idempotency_is_scoped_to_the_model_and_hashed_not_truncated(
        keyed: httpx.AsyncClient, settings: Settings) -> None:
    h = {**_auth("alpha-key"), "Idempotency-Key": "k" * 300}
    first = await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}}, headers=h)
    # The same key for another model is another namespace (no 409 for the other body).
    mlp = await keyed.post("/v1/models/mlp/jobs", json={"input": {"features": [0.0] * 256}},
                           headers=h)
    assert first.status_code == mlp.status_code == 202
    assert first.json()["id"] != mlp.json()["id"]
    # Keys that share their first 200 characters are still different keys.
    longer = await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 2}},
                              headers={**h, "Idempotency-Key": "k" * 300 + "2"})
    assert longer.status_code == 202 and longer.json()["id"] != first.json()["id"]
    names = redis.Redis.from_url(settings.redis_url, decode_responses=True).keys("ai:idem:*")
    assert len(names) == 3 and not any("kkkk" in n for n in names)  # digests, not the keys


async def test_a_replay_is_answered_for_as_long_as_the_key_lives(
        keyed: httpx.AsyncClient, settings: Settings) -> None:
    """The key never outlives the jobs it names: queued, finished or canceled."""
    r = redis.Redis.from_url(settings.redis_url)
    h = {**_auth("alpha-key"), "Idempotency-Key": "lifetime"}
    job = (await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                            headers=h)).json()
    [idem] = r.keys("ai:idem:*")
    assert 0 < r.pttl(idem) <= r.pttl(keys.job(job["id"]))
    assert r.pttl(idem) <= settings.result_ttl_s * 1000
    await keyed.delete(f"/v1/jobs/{job['id']}", headers=_auth("alpha-key"))
    assert r.pttl(idem) <= r.pttl(keys.job(job["id"]))
    again = await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}}, headers=h)
    assert again.status_code == 200 and again.json()["status"] == "canceled"  # final: 200


async def test_the_key_lifetime_is_capped_by_the_records(settings: Settings) -> None:
    store = JobStore(connect(settings), result_ttl_s=600, job_ttl_s=60,
                     idempotency_ttl_s=86_400)
    await store.redis.aclose()
    assert store.idempotency_ttl_ms == 600_000


async def test_one_api_key_cannot_fill_the_queue_for_the_others(
        keyed: httpx.AsyncClient, settings: Settings) -> None:
    # tests/models.toml: max_queue = 500 for synthetic, so 250 per key by default.
    alpha, beta = _auth("alpha-key"), _auth("beta-key")
    r = await keyed.post("/v1/models/synthetic/jobs:batch",
                         json={"inputs": [{"x": i} for i in range(250)]}, headers=alpha)
    assert r.status_code == 202
    over = await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                            headers=alpha)
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
    assert over.json()["error"]["scope"] == "api_key"
    assert (await keyed.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                             headers=beta)).status_code == 202
    # Jobs that leave the queue (a worker starts them) make room for the key again.
    store = JobStore(connect(settings), result_ttl_s=60, job_ttl_s=60)
    started = [j["id"] for j in r.json()["jobs"][:5]]
    # As the protocol hands them to a worker: its consumer owns their entries, then START.
    stream = keys.stream("synthetic", "normal")
    await store.redis.xgroup_create(stream, keys.BATCHER_GROUP, id="0")
    await store.redis.xreadgroup(keys.BATCHER_GROUP, keys.worker_consumer("w-1"),
                                 {stream: ">"}, count=5)
    verdicts = await store.start(started, "w-1", "cpu:0", consumer=keys.worker_consumer("w-1"))
    assert {v.verdict for v in verdicts} == {"run"}
    await store.redis.aclose()
    more = await keyed.post("/v1/models/synthetic/jobs:batch",
                            json={"inputs": [{"x": i} for i in range(5)]}, headers=alpha)
    assert more.status_code == 202, more.text


async def test_fault_hooks_are_refused_unless_the_setting_enables_them(
        settings: Settings) -> None:
    for enabled in (False, True):
        app = create_app(settings.model_copy(update={"fault_injection": enabled}))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            schema = (await c.get("/v1/models/synthetic")).json()["input_schema"]
            assert ("fail" in schema["properties"]) is enabled
            for hook in ({"fail": "kill"}, {"fail": "hang"}, {"sleep_s": 30}):
                r = await c.post("/v1/models/synthetic/jobs", json={"input": {"x": 1, **hook}})
                assert r.status_code == (202 if enabled else 422), (hook, r.text)
                if not enabled:
                    assert r.json()["error"]["field"] == f"input.{next(iter(hook))}"
            # Left at their defaults, the hooks are no reason to refuse anything.
            ok = await c.post("/v1/models/synthetic/jobs",
                              json={"input": {"x": 1, "fail": None, "sleep_s": 0}})
            assert ok.status_code == 202


async def test_auth_is_checked_before_routing_and_names_its_scheme(
        keyed: httpx.AsyncClient) -> None:
    r = await keyed.get("/v1/nothing-here")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await keyed.put("/v1/jobs/x", headers=_auth("alpha-key"))
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, HEAD"
