"""Webhook delivery against a real HTTP receiver, a real Redis and the real app's deliverer."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
import standardwebhooks
from redis.exceptions import ResponseError

from gateway.app import create_app
from gateway.webhook_targets import TargetPolicy
from gateway.webhooks import signed_headers, verify_signature
from shared import keys
from shared.redisconn import connect
from shared.settings import Settings
from shared.store import JobStore, NewJob, Outcome

SECRET = "whsec_" + base64.b64encode(b"test-secret-of-32-bytes-for-hmac").decode()
MAX_ATTEMPTS = 4
BACKOFF_S = 0.05


@dataclass
class Hit:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP server on a free port: records every request and answers from `script`
    (one status per request; the last one repeats), with optional extra headers."""

    script: list[int]
    headers: dict[str, str] = field(default_factory=dict)
    reply: Callable[[Hit], bytes] = lambda _: b"{}"
    hits: list[Hit] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                hit = Hit(time.monotonic(), {k.lower(): v for k, v in self.headers.items()},
                          self.rfile.read(size))
                receiver.hits.append(hit)
                status = receiver.script[min(len(receiver.hits), len(receiver.script)) - 1]
                body = receiver.reply(hit) if status < 300 else b'{"error": {}}'
                self.send_response(status)
                for name, value in {**receiver.headers, "content-type": "application/json",
                                    "content-length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The receivers listen on loopback, which the address policy refuses unless allow-listed.
    return settings.model_copy(update={
        "webhook_secret": SECRET, "webhook_allow": ["127.0.0.1/32"], "webhook_backoff_s": BACKOFF_S,
        "webhook_max_attempts": MAX_ATTEMPTS, "webhook_timeout_s": 2.0, "reclaim_idle_s": 1.0})


async def until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for a condition without blocking the event loop the deliverer runs in."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def drained(settings: Settings) -> Callable[[], bool]:
    """True once every webhook entry was acked and deleted (delivered or given up)."""
    r = redis.Redis.from_url(settings.redis_url)
    return lambda: r.xlen(keys.webhooks()) == 0


async def finished_job(client: httpx.AsyncClient, settings: Settings, url: str) -> str:
    """Submit through the app with a webhook, then write the final state as a worker does."""
    r = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 2}, "webhook": url})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    store = JobStore(connect(settings), result_ttl_s=60, job_ttl_s=60)
    assert await store.finish([Outcome(job_id, "succeeded", output_json='{"y": 4.0}',
                                       metrics={"worker": "w-1", "batch_size": 1})]) == [True]
    await store.redis.aclose()
    return job_id


async def test_delivers_the_signed_public_json_once(client: httpx.AsyncClient,
                                                    settings: Settings) -> None:
    with Receiver([200]) as rx:
        job_id = await finished_job(client, settings, rx.url)
        await until(drained(settings), 10, "the webhook to be delivered and acked")
    assert len(rx.hits) == 1
    hit = rx.hits[0]
    public = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert json.loads(hit.body) == public and public["output"] == {"y": 4.0}
    assert hit.headers["x-asyncinfer-job"] == job_id and hit.headers["x-asyncinfer-attempt"] == "1"
    assert hit.headers["webhook-id"] == f"msg_{job_id}"
    assert verify_signature(SECRET, hit.headers, hit.body)
    # The reference implementation of Standard Webhooks accepts it as it is.
    standardwebhooks.Webhook(SECRET).verify(hit.body, hit.headers)
    assert not verify_signature("whsec_b3RoZXI=", hit.headers, hit.body)
    assert not verify_signature(SECRET, hit.headers, hit.body.replace(b"4.0", b"5.0"))
    assert not verify_signature(SECRET, hit.headers, hit.body, now=time.time() + 3600)  # replay
    forged = {**hit.headers, "webhook-signature": "v1,ZGVhZGJlZWY="}
    assert not verify_signature(SECRET, forged, hit.body)


async def test_retries_with_backoff_until_the_receiver_recovers(client: httpx.AsyncClient,
                                                                settings: Settings) -> None:
    with Receiver([500, 500, 200]) as rx:
        await finished_job(client, settings, rx.url)
        await until(drained(settings), 10, "the webhook to be delivered and acked")
    assert [h.headers["x-asyncinfer-attempt"] for h in rx.hits] == ["1", "2", "3"]
    assert len({h.headers["webhook-id"] for h in rx.hits}) == 1  # same message id
    gaps = [b.at - a.at for a, b in zip(rx.hits, rx.hits[1:], strict=False)]
    # Exponential with jitter in [0.5, 1]: at least half of 0.05 s, then half of 0.1 s.
    assert gaps[0] >= BACKOFF_S * 0.5 and gaps[1] >= BACKOFF_S


async def test_gives_up_after_the_bounded_attempts_and_leaves_the_job_alone(
        client: httpx.AsyncClient, settings: Settings) -> None:
    with Receiver([500], headers={"retry-after": "0"}) as rx:
        job_id = await finished_job(client, settings, rx.url)
        before = (await client.get(f"/v1/jobs/{job_id}")).json()
        # Drained means acked and deleted: no entry is left that any deliverer could retry.
        await until(drained(settings), 10, "the webhook to be given up")
    assert len(rx.hits) == MAX_ATTEMPTS
    after = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert after == before and after["status"] == "succeeded"
    r = redis.Redis.from_url(settings.redis_url)
    assert r.xpending(keys.webhooks(), keys.WEBHOOK_GROUP)["pending"] == 0


async def test_a_4xx_answer_is_final_and_canceled_jobs_notify_too(client: httpx.AsyncClient,
                                                                  settings: Settings) -> None:
    with Receiver([400]) as rx:
        r = await client.post("/v1/models/synthetic/jobs",
                              json={"input": {"x": 1}, "webhook": rx.url})
        assert (await client.delete(f"/v1/jobs/{r.json()['id']}")).status_code == 200
        await until(drained(settings), 10, "the webhook to be given up")
    assert len(rx.hits) == 1 and json.loads(rx.hits[0].body)["status"] == "canceled"


async def test_entries_of_a_dead_deliverer_are_reclaimed_and_keep_their_schedule(
        settings: Settings) -> None:
    """A deliverer died holding an entry after 3 of 4 attempts: the live one takes it over
    once it is idle and makes only the one attempt left."""
    store = JobStore(connect(settings), result_ttl_s=60, job_ttl_s=60)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    r.xgroup_create(keys.webhooks(), keys.WEBHOOK_GROUP, id="0", mkstream=True)
    with Receiver([500]) as rx:
        done = await store.submit("synthetic", [NewJob('{"x": 1}', webhook=rx.url)],
                                  max_queue=10)
        job_id = done.ids[0]
        await store.finish([Outcome(job_id, "succeeded", output_json='{"y": 2.0}')])
        await store.redis.aclose()
        r.xreadgroup(keys.WEBHOOK_GROUP, "dead-gateway", {keys.webhooks(): ">"})
        r.hset(keys.webhook_delivery(job_id), mapping={"attempts": 3, "next_ms": 0})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await until(drained(settings), 10, "the reclaimed webhook to be given up")
    assert [h.headers["x-asyncinfer-attempt"] for h in rx.hits] == ["4"]


async def test_a_restarted_gateway_goes_on_with_the_schedule(settings: Settings) -> None:
    """Stopped between attempts, a deliverer hands its entry over; the next one makes attempt 2
    when it is due, with the same delivery id."""
    settings = settings.model_copy(update={"webhook_backoff_s": 1.0})
    with Receiver([500, 200]) as rx:
        app = create_app(settings)
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://gw") as http:
            await finished_job(http, settings, rx.url)
            await until(lambda: len(rx.hits) == 1, 10, "the first attempt")
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            await until(drained(settings), 10, "the second attempt")
    assert [h.headers["x-asyncinfer-attempt"] for h in rx.hits] == ["1", "2"]
    assert rx.hits[0].headers["webhook-id"] == rx.hits[1].headers["webhook-id"]


def test_signature_helper_round_trips_and_signs_with_every_secret() -> None:
    body = b'{"id":"x"}'
    new, old = SECRET, "whsec_" + base64.b64encode(b"the-old-secret").decode()
    headers = signed_headers(f"{new} {old}", "msg_x", body, timestamp=1_700_000_000)
    assert len(headers["webhook-signature"].split()) == 2  # a rotation: both keys sign
    for secret in (new, old):
        assert verify_signature(secret, headers, body.decode(), now=1_700_000_100)
    assert not verify_signature(new, headers, body, tolerance_s=10, now=1_700_000_100)


@pytest.fixture
def unlisted(settings: Settings) -> Settings:
    """The default address policy: nothing allow-listed."""
    return settings.model_copy(update={"webhook_allow": []})


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://app.localhost/x",
    "http://169.254.169.254/latest/meta-data", "http://[fd00:ec2::254]/", "http://10.0.0.7/",
    "http://192.168.1.1/", "http://172.16.0.1/", "http://100.100.100.200/", "http://[::1]/",
    "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://224.0.0.1/", "ftp://example.com/",
    "http:///nohost"])
async def test_private_loopback_and_metadata_targets_are_422_at_submit(
        unlisted: Settings, url: str) -> None:
    app = create_app(unlisted)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}, "webhook": url})
    assert r.status_code == 422 and r.json()["error"]["field"] == "webhook", r.text


async def test_webhooks_are_refused_without_a_secret(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"webhook_secret": ""}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.post("/v1/models/synthetic/jobs",
                         json={"input": {"x": 1}, "webhook": "https://example.com/hook"})
    assert r.status_code == 422 and "SECRET" in r.json()["error"]["message"]


async def test_a_name_that_rebinds_to_loopback_after_submit_is_refused_at_connect(
        unlisted: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """DNS rebinding: the name resolves to a public address when the submit is checked, then to
    the receiver on 127.0.0.1 when the deliverer connects. The connection is never made."""
    answers = iter(["93.184.216.34"])

    async def rebinding(host: str, port: int) -> list[str]:
        return [next(answers, "127.0.0.1")]

    with Receiver([200]) as rx:
        port = rx.server.server_address[1]
        app = create_app(unlisted, targets=TargetPolicy([], resolver=rebinding))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            with caplog.at_level(logging.INFO, logger="gateway.webhooks"):
                job_id = await finished_job(c, unlisted, f"http://hooks.example:{port}/hook")
                await until(drained(unlisted), 10, "the webhook to be given up")
    assert rx.hits == []
    # Refused for good at the first attempt (no retry can change an address policy).
    r = redis.Redis.from_url(unlisted.redis_url, decode_responses=True)
    assert r.hget(keys.webhook_delivery(job_id), "attempts") == "1"
    assert any("resolves to 127.0.0.1, a loopback address" in rec.getMessage()
               for rec in caplog.records)


async def test_an_allow_listed_name_may_resolve_to_a_private_address(
        settings: Settings) -> None:
    async def internal(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    policy = TargetPolicy(["hooks.internal"], resolver=internal)
    with Receiver([200]) as rx:
        port = rx.server.server_address[1]
        app = create_app(settings, targets=policy)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            await finished_job(c, settings, f"http://hooks.internal:{port}/hook")
            await until(drained(settings), 10, "the webhook to be delivered")
    assert len(rx.hits) == 1


def test_the_address_policy() -> None:
    policy = TargetPolicy(["10.1.0.0/16"])
    assert policy.address_refused("93.184.216.34") is None
    assert policy.address_refused("2606:4700:4700::1111") is None
    assert policy.address_refused("10.1.2.3") is None  # allow-listed
    for address in ("10.2.0.1", "127.0.0.1", "169.254.169.254", "fe80::1", "::1", "fc00::1",
                    "::ffff:10.2.0.1", "64:ff9b::a9fe:a9fe", "100.64.0.1", "0.0.0.0",
                    "255.255.255.255", "192.0.2.1"):
        assert policy.address_refused(address) is not None, address


async def test_webhook_events_running_then_final(client: httpx.AsyncClient,
                                                 settings: Settings) -> None:
    with Receiver([200]) as rx:
        r = await client.post("/v1/models/synthetic/jobs", json={
            "input": {"x": 2}, "webhook": rx.url, "webhook_events": ["running", "final"]})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        store = JobStore(connect(settings), result_ttl_s=60, job_ttl_s=60)
        # As a worker does: its consumer holds the entry, START, then FINISH.
        stream = keys.stream("synthetic", "normal")
        with contextlib.suppress(ResponseError):
            await store.redis.xgroup_create(stream, keys.BATCHER_GROUP, id="0")
        await store.redis.xreadgroup(keys.BATCHER_GROUP, keys.worker_consumer("w-1"),
                                     {stream: ">"}, count=1)
        [started] = await store.start([job_id], "w-1", "cpu:0",
                                      consumer=keys.worker_consumer("w-1"))
        assert started.verdict == "run"
        await until(lambda: len(rx.hits) == 1, 10, "the running webhook")
        await store.finish([Outcome(job_id, "succeeded", output_json='{"y": 4.0}')])
        await store.redis.aclose()
        await until(drained(settings), 10, "both webhooks delivered")
    assert [h.headers["x-asyncinfer-event"] for h in rx.hits] == ["running", "final"]
    assert [json.loads(h.body)["status"] for h in rx.hits] == ["running", "succeeded"]
    assert rx.hits[0].headers["webhook-id"] != rx.hits[1].headers["webhook-id"]
