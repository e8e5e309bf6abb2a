"""The HTTP contract's shapes and error statuses, against the real app and a real Redis: each
test runs twice, in process (ASGI) and against a real uvicorn process over TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import redis

from gateway.app import create_app
from shared import keys
from shared.settings import Settings


@pytest.fixture(params=["asgi", "uvicorn"])
async def client(request: pytest.FixtureRequest, settings: Settings
                 ) -> AsyncIterator[httpx.AsyncClient]:
    if request.param == "asgi":
        app = create_app(settings)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            yield c
        return
    async with httpx.AsyncClient(base_url=request.getfixturevalue("uvicorn_gateway")) as c:
        yield c


async def test_submit_answers_202_with_location_and_queues_one_entry(
        client: httpx.AsyncClient, settings: Settings) -> None:
    r = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1.5}})
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["model"] == "synthetic"
    assert set(job["metrics"]) >= {"queue_ms", "run_ms", "batch_size", "worker", "device",
                                   "attempts"}
    stream = keys.stream("synthetic", "normal")
    assert redis.Redis.from_url(settings.redis_url).xlen(stream) == 1
    got = await client.get(f"/v1/jobs/{job['id']}")
    assert got.status_code == 200 and got.json()["id"] == job["id"]


async def test_batch_submit_keeps_input_order(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models/synthetic/jobs:batch",
                          json={"inputs": [{"x": i} for i in range(5)], "priority": "high"})
    assert r.status_code == 202
    jobs = r.json()["jobs"]
    assert len(jobs) == 5 and len({j["id"] for j in jobs}) == 5
    assert all(j["priority"] == "high" for j in jobs)


async def test_unknown_model_and_job_are_404_with_error_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models/nope/jobs", json={"input": 1})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found" and r.json()["error"]["message"]
    assert (await client.get("/v1/jobs/does-not-exist")).status_code == 404
    assert (await client.delete("/v1/jobs/does-not-exist")).status_code == 404
    assert (await client.get("/v1/models/nope")).status_code == 404


async def test_invalid_input_is_422_naming_the_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": "not a number"}})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "input.x"
    r = await client.post("/v1/models/mlp/jobs", json={"input": {"features": [1.0, 2.0]}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "input.features"
    r = await client.post("/v1/models/synthetic/jobs:batch",
                          json={"inputs": [{"x": 1}, {"y": 2}]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "inputs.1.x"


async def test_bad_envelope_is_422_never_500(client: httpx.AsyncClient) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"input": {"x": 1}, "priority": "urgent"}', "priority"),
        (b'{"input": {"x": 1}, "ttl_s": -3}', "ttl_s"),
        (b'{"priority": "high"}', "input"),
        (b'{"inputs": []}', "inputs"),
    ]
    for body, field in cases:
        path = "/v1/models/synthetic/jobs" + (":batch" if b"inputs" in body else "")
        r = await client.post(path, content=body,
                              headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["field"] == field, (body, r.json())


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient,
                                          settings: Settings) -> None:
    big = {"input": {"x": 1.0}, "pad": "x" * (settings.max_body_bytes + 10)}
    r = await client.post("/v1/models/synthetic/jobs", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "payload_too_large"


async def test_cancel_queued_then_cancel_again_is_409(client: httpx.AsyncClient,
                                                      settings: Settings) -> None:
    job = (await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 2}})).json()
    r = await client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    # The stream entry is gone with it: nothing is left to compute.
    assert redis.Redis.from_url(settings.redis_url).xlen(keys.stream("synthetic", "normal")) == 0
    again = await client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"


async def test_models_list_shows_schemas_and_config(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == {"synthetic", "mlp"}
    m = models["synthetic"]
    assert m["input_schema"]["properties"]["x"]["type"] == "number"
    assert m["batching"]["max_batch_size"] == 16
    assert m["scaling"]["concurrency_target"] == 8
    assert m["queue_depth"] == 0 and m["workers"] == []


async def test_health_ready_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    submitted = 'asyncinfer_jobs_submitted_total{model="synthetic"} '

    async def counted() -> float:  # the process's counter: the uvicorn gateway outlives tests
        lines = (await client.get("/metrics")).text.splitlines()
        return sum(float(ln.removeprefix(submitted)) for ln in lines if ln.startswith(submitted))

    before = await counted()
    await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    text = (await client.get("/metrics")).text
    assert await counted() == before + 1
    assert 'asyncinfer_queue_jobs{model="synthetic"} 1.0' in text


async def test_queued_job_past_its_ttl_reads_expired(client: httpx.AsyncClient) -> None:
    job = (await client.post("/v1/models/synthetic/jobs",
                             json={"input": {"x": 1}, "ttl_s": 0.001})).json()
    got = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert got["status"] == "expired" and got["error"]["type"] == "expired"
