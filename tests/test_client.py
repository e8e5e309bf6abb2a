"""The Python client against the real system: a gateway, batcher and worker as processes for the
round trips, the in-process app for auth and a real queue-full, and a scripted HTTP server for
the retry policy."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from asyncinfer.client import ApiError, AsyncClient, Client
from gateway.app import create_app
from shared.modelspec import load_specs
from shared.procs import free_port
from shared.settings import Settings
from tests.conftest import MODELS, Procs
from tests.gateway.test_webhooks import Receiver

JOB = b'{"id": "j1", "model": "synthetic", "status": "queued", "created_at": "2024-01-01"}'


@pytest.fixture
def gateway_url(procs: Procs, settings: Settings) -> str:
    """A gateway, a batcher and one synthetic worker, each a real process."""
    url = procs.serving()
    return url


async def test_sync_and_async_clients_round_trip_through_the_real_system(
        gateway_url: str) -> None:
    with Client(gateway_url) as c:
        models = {m.name: m for m in c.models()}
        assert "x" in models["synthetic"].input_schema["properties"]
        assert models["synthetic"].batching["max_batch_size"] == 16

        job = c.run("synthetic", {"x": 21}, timeout_s=30)
        assert job.status == "succeeded" and job.output == {"y": 42.0}
        assert job.metrics.batch_size and job.metrics.worker

        queued = c.submit("synthetic", {"x": 1}, priority="high")
        assert queued.status in ("queued", "running", "succeeded")
        assert c.get(queued.id, wait=30).output == {"y": 2.0}

        many = c.submit_many("synthetic", [{"x": i} for i in range(3)])
        assert [c.get(j.id, wait=30).output for j in many] == [{"y": 2.0 * i} for i in range(3)]

        first = c.submit("synthetic", {"x": 5}, idempotency_key="k-1")
        assert c.submit("synthetic", {"x": 5}, idempotency_key="k-1").id == first.id

        with pytest.raises(ApiError) as missing:
            c.get("no-such-job")
        assert (missing.value.status, missing.value.type) == (404, "not_found")
        with pytest.raises(ApiError) as invalid:
            c.submit("synthetic", {"x": "NaN-ish"})
        assert invalid.value.status == 422 and invalid.value.detail["field"] == "input.x"
        with pytest.raises(ApiError) as final:
            c.cancel(job.id)
        assert (final.value.status, final.value.type) == (409, "conflict")

    async with AsyncClient(gateway_url) as ac:
        job = await ac.run("synthetic", {"x": 3}, timeout_s=30)
        assert job.status == "succeeded" and job.output == {"y": 6.0}
        # No mlp worker runs in this test, so the job stays queued until canceled.
        queued = await ac.submit("mlp", {"features": [0.5] * 256})
        canceled = await ac.cancel(queued.id)
        assert canceled.status == "canceled" and canceled.error is not None
        assert (await ac.get(queued.id)).status == "canceled"


@pytest.fixture
async def in_process(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app (no workers) with API keys on and a backlog limit of 2 jobs."""
    specs = load_specs(MODELS)
    synthetic = specs["synthetic"]
    specs["synthetic"] = synthetic.model_copy(
        update={"options": synthetic.options.model_copy(
            update={"max_queue": 2, "max_queue_per_key": 2})})
    keys = [hashlib.sha256(k.encode()).hexdigest() for k in ("key-a", "key-b")]
    app = create_app(settings.model_copy(update={"api_keys": keys}), specs)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport) as http:
        yield http


async def test_api_key_scopes_jobs_and_queue_full_is_a_429_with_retry_after(
        in_process: httpx.AsyncClient) -> None:
    anonymous = AsyncClient("http://gw", api_key="", http=in_process)
    a = AsyncClient("http://gw", api_key="key-a", http=in_process, max_retries=0)
    b = AsyncClient("http://gw", api_key="key-b", http=in_process)
    with pytest.raises(ApiError) as unauthorized:
        await anonymous.models()
    assert (unauthorized.value.status, unauthorized.value.type) == (401, "unauthorized")

    job = await a.submit("synthetic", {"x": 1})
    assert (await a.get(job.id)).id == job.id
    with pytest.raises(ApiError) as other:
        await b.get(job.id)
    assert other.value.status == 404

    with pytest.raises(ApiError) as timeout:  # no worker runs: never final
        await a.run("synthetic", {"x": 2}, timeout_s=0.3)
    assert timeout.value.status is None and timeout.value.type == "timeout"
    with pytest.raises(ApiError) as full:
        await a.submit("synthetic", {"x": 3})
    assert (full.value.status, full.value.type) == (429, "queue_full")
    assert full.value.retry_after_s is not None and full.value.retry_after_s >= 1


def test_503_is_retried_after_the_servers_retry_after() -> None:
    with Receiver([503, 200], headers={"retry-after": "1"}, reply=lambda _: JOB) as rx:
        started = time.monotonic()
        job = Client(rx.url.removesuffix("/hook"), max_retries=2).get("j1")
        took = time.monotonic() - started
    assert job.id == "j1" and len(rx.hits) == 2
    assert took >= 1.0  # it waited out Retry-After: 1 before the second try


def test_every_submit_has_an_idempotency_key_its_retries_repeat() -> None:
    with Receiver([503, 202, 202], headers={"retry-after": "0"}, reply=lambda _: JOB) as rx:
        client = Client(rx.url.removesuffix("/hook"), max_retries=2)
        client.submit("synthetic", {"x": 1})  # answered 503, then 202 on the retry
        client.submit("synthetic", {"x": 1})
    keys = [h.headers.get("idempotency-key") for h in rx.hits]
    assert len(keys) == 3 and all(keys)
    assert keys[0] == keys[1] != keys[2]  # one key per call, the same on its retry


def test_429_retries_are_bounded_then_raise() -> None:
    with Receiver([429], headers={"retry-after": "0"}) as rx, pytest.raises(ApiError) as exc:
        Client(rx.url.removesuffix("/hook"), max_retries=2).submit("m", {"x": 1})
    assert exc.value.status == 429 and len(rx.hits) == 3  # the first try and two retries
    assert rx.hits[0].headers["content-type"] == "application/json"


def test_unreachable_server_is_a_connection_error() -> None:
    with pytest.raises(ApiError) as exc:
        Client(f"http://127.0.0.1:{free_port()}", timeout_s=2).models()
    assert exc.value.status is None and exc.value.type == "connection_error"
