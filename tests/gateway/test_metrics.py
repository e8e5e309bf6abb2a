"""/metrics by Prometheus' conventions: promtool finds no problem, every family obeys the naming
rules (one quantity per metric, its base unit in the name, counters `_total`, no label that
selects the quantity), and two gateway replicas on one Redis never count the system twice."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest
import redis.asyncio as aioredis

from batcher.policy import PolicySnapshot
from batcher.state import BatcherStats, published_state
from gateway.app import create_app
from shared import keys
from shared.heartbeats import Heartbeat, HeartbeatPublisher
from shared.histograms import END_TO_END, RUN, LatencyRecorder
from shared.settings import Settings

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian package `prometheus`; .ci/run "
    "installs it)")
UNITS = ("seconds", "rows", "jobs", "batches", "workers", "lanes", "autoscalers",
         "rows_per_second")
# A 0/1 flag is its own unit; each exception says why.
UNITLESS = {"asyncinfer_gateway_system_exporter": "0/1: whether this replica exports the "
            "system-wide series"}
# Labels that would make one name carry several quantities.
SELECTOR_LABELS = {"value", "name", "metric", "quantity", "kind", "field", "unit"}


def promtool_problems(text: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    return (done.stdout + done.stderr).strip() if done.returncode else ""


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    """family name -> (type, label names of its samples)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        out[name] = (kind, set())
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        assert m, line
        sample, labels = m.group(1), m.group(2) or ""
        base = next(f for f in (sample, re.sub(r"_(bucket|count|sum|total)$", "", sample))
                    if f in out)
        out[base][1].update(re.findall(r'([a-zA-Z_]\w*)="', labels))
    return out


async def _populate(settings: Settings) -> None:
    """Everything the system-wide series read, as the batcher, a worker and the autoscaler
    write it."""
    r = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    stats = BatcherStats()
    stats.dispatched("full", 16, [0.004] * 16)
    stats.dispatched("probe", 1, [0.0002])
    stats.shed_jobs("expired", 2)
    stats.done(10.0, 16, 1.5)
    stats.deaths, stats.requeued, stats.suspects_run = 1, 3, 2
    snap = PolicySnapshot(a_s=0.001, b_s=0.005, avg_wait_ms=2.5, in_flight=1, queue_rows=4,
                          queue_entries=4, extra={"overhead_s": 0.0004})
    state = published_state(snap=snap, stats=stats, now=11.0, batcher="b1", in_flight=1,
                            held=4, suspects=0, lanes=2, free_lanes=1, workers=1, lead_s=0.0007)
    await r.set(keys.batcher_state("synthetic"), json.dumps(state))
    await r.lpush(keys.scale_history("synthetic"), json.dumps(
        {"desired": 2, "action": "up", "delta": 1, "reason": "x", "queued": 30, "in_flight": 4,
         "live": 1, "starting": 1, "free_devices": 0}))
    latencies = LatencyRecorder("synthetic")
    for s in (0.004, 0.02, 0.3, 7.0, 500.0):
        latencies.observe(RUN, s / 2)
        latencies.observe(END_TO_END, s)
    await latencies.flush(r)
    await HeartbeatPublisher(r, Heartbeat(name="w1", model="synthetic", index=1, device="cpu:1",
                                          lanes=1, state="ready"), 1.0, 3.0).publish()
    await r.hincrby(keys.stats("synthetic"), "succeeded", 5)
    await r.hset(keys.restarts(), "batcher", 2)  # what `asyncinfer up` counts
    await r.aclose()


@pytest.fixture
async def two_gateways(settings: Settings) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with AsyncExitStack() as stack:
        clients = []
        for i in range(2):
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            clients.append(await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url=f"http://gw{i}")))
        yield clients


@needs_promtool
async def test_promtool_finds_no_problem(client: httpx.AsyncClient, settings: Settings) -> None:
    await _populate(settings)
    await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    text = (await client.get("/metrics")).text
    for family in ("asyncinfer_batch_size_rows", "asyncinfer_job_queue_wait_seconds",
                   "asyncinfer_job_run_seconds", "asyncinfer_job_end_to_end_seconds",
                   "asyncinfer_submit_duration_seconds", "asyncinfer_batcher_row_cost_seconds",
                   "asyncinfer_autoscaler_desired_workers", "asyncinfer_jobs_finished_total"):
        assert family in text  # every kind of series is in what promtool checks
    assert promtool_problems(text) == ""


async def test_names_follow_the_conventions(client: httpx.AsyncClient,
                                            settings: Settings) -> None:
    await _populate(settings)
    await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    found = families((await client.get("/metrics")).text)
    assert len(found) > 25
    for name, (kind, labels) in found.items():
        assert re.fullmatch(r"asyncinfer_[a-z0-9_]+", name), name
        assert not labels & SELECTOR_LABELS, f"{name} has a label choosing the quantity"
        assert not re.search(r"_(ms|milliseconds|minutes|hours|percent)(_|$)", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
            unit_part = name.removesuffix("_total")
            assert unit_part.endswith(tuple(f"_{u}" for u in UNITS)) or \
                unit_part.split("_")[-1] in {"submitted", "finished", "deaths", "restarts"}, name
        else:
            assert not name.endswith("_total"), f"{kind} {name} ends in _total"
            assert name in UNITLESS or name.endswith(tuple(f"_{u}" for u in UNITS)), \
                f"{name} names no unit"


async def test_histograms_cover_inference_latencies(client: httpx.AsyncClient,
                                                    settings: Settings) -> None:
    await _populate(settings)
    text = (await client.get("/metrics")).text
    e2e = dict(re.findall(r'asyncinfer_job_end_to_end_seconds_bucket\{le="([^"]+)",'
                          r'model="synthetic"\} (\S+)', text))
    assert float(e2e["0.005"]) == 1 and float(e2e["10.0"]) == 4 and float(e2e["+Inf"]) == 5
    assert float(e2e["0.001"]) == 0 and float(e2e["120.0"]) == 4  # 1 ms .. 2 min
    assert 'asyncinfer_batch_size_rows_bucket{le="16.0",model="synthetic"} 2.0' in text
    assert 'asyncinfer_batcher_shed_jobs_total{model="synthetic",reason="expired"} 2.0' in text
    assert 'asyncinfer_batcher_batches_total{model="synthetic",reason="full"} 1.0' in text


def _value(text: str, sample: str) -> float:
    """Sum of the samples whose line starts with `sample` (a name, or a name and labels)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((sample + " ", sample + "{")))


async def test_two_gateways_do_not_double_count(two_gateways: list[httpx.AsyncClient],
                                                settings: Settings) -> None:
    await _populate(settings)
    a, b = two_gateways
    for _ in range(3):
        await a.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    await b.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
    for _ in range(2):  # a scrape round, then another: the exporter stays put
        texts = [(await c.get("/metrics")).text for c in (a, b)]

        def total(name: str, texts: list[str] = texts) -> float:
            return sum(_value(t, name) for t in texts)

        assert total("asyncinfer_gateway_system_exporter") == 1
        assert total('asyncinfer_queue_jobs{model="synthetic"}') == 4  # what sum() shows
        assert total('asyncinfer_jobs_finished_total{model="synthetic",status="succeeded"}') == 5
        assert total('asyncinfer_workers{model="synthetic",state="ready"}') == 1
        assert total("asyncinfer_job_end_to_end_seconds_count") == 5
        # Each replica's own figures: theirs to sum.
        assert total('asyncinfer_jobs_submitted_total{model="synthetic"}') == 4
    exporter = 0 if _value(texts[0], "asyncinfer_gateway_system_exporter") else 1
    # The exporter goes away (its lease lapses): the other replica takes over at its scrape.
    r = aioredis.Redis.from_url(settings.redis_url)
    await r.delete(keys.metrics_exporter())
    await r.aclose()
    other = two_gateways[1 - exporter]
    text = (await other.get("/metrics")).text
    assert _value(text, "asyncinfer_gateway_system_exporter") == 1
    assert _value(text, 'asyncinfer_queue_jobs{model="synthetic"}') == 4
    again = (await two_gateways[exporter].get("/metrics")).text
    assert _value(again, "asyncinfer_gateway_system_exporter") == 0
    assert "asyncinfer_queue_jobs" not in again
