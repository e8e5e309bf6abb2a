"""Chaos under steady load: kill -9 a worker, kill -9 the batcher, restart Redis (AOF on), kill
the gateway. After each, every job answered 202 reaches exactly one final state."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from asyncinfer.loadgen import SteadyLoad
from shared import keys
from shared.redisserver import RedisServer
from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready

pytestmark = pytest.mark.slow
FINAL = {"succeeded", "failed", "canceled", "expired"}


def _load(url: str) -> SteadyLoad:
    return SteadyLoad(url, "synthetic", lambda n: {"x": n, "sleep_s": 0.05}, 25).start()


def _settle(url: str, settings: Settings, load: SteadyLoad, what: str) -> None:
    """Every accepted job reaches one final state; the record of first writes proves 'once'."""
    accepted = load.accepted
    assert accepted, "the load generator got no job accepted"
    statuses: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=90) as client:
        deadline = time.monotonic() + 120
        for job_id in accepted:
            while time.monotonic() < deadline:
                try:
                    body = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
                except httpx.HTTPError:
                    time.sleep(0.2)  # the gateway may be restarting in the chaos test
                    continue
                if body["status"] in FINAL:
                    statuses[job_id] = body["status"]
                    break
    lost = [j for j in accepted if j not in statuses]
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    written = {k: int(v) for k, v in r.hgetall(keys.stats("synthetic")).items()}
    print(f"chaos[{what}]: accepted={len(accepted)} final={len(statuses)} lost={len(lost)} "
          f"first-writes={written} refused={dict(load.refused)}")
    assert not lost, f"{len(lost)} accepted jobs never finished"
    assert all(s == "succeeded" for s in statuses.values()), statuses
    # Each job's final state is written once: the first-write counter equals the job count,
    # plus jobs whose submit reached Redis but whose answer died with a killed gateway, or with a
    # Redis that ran the submit and stopped before it replied (the gateway then answers 503: it
    # cannot know; with appendfsync always the reply waits for the fsync, so this can happen).
    unanswered = load.unanswered + load.refused.get("503", 0)
    assert len(accepted) <= sum(written.values()) <= len(accepted) + unanswered


def _run_with_fault(procs: Procs, settings: Settings, fault: Callable[[], None],
                    what: str, url: str | None = None) -> SteadyLoad:
    url = url or procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 1), 60, "a worker")
    load = _load(url)
    time.sleep(2)  # steady state before the fault
    fault()
    time.sleep(3)
    load.stop()
    _settle(url, settings, load, what)
    return load


def test_kill_worker_mid_batch(procs: Procs, settings: Settings) -> None:
    procs.batcher()
    victim = procs.worker("synthetic", 1)

    def fault() -> None:
        os.killpg(victim.pid, signal.SIGKILL)
        procs.worker("synthetic", 2)

    _run_with_fault(procs, settings, fault, "kill -9 worker")


def test_kill_batcher_standby_takes_over(procs: Procs, settings: Settings) -> None:
    leader = procs.batcher()
    time.sleep(1)  # the first one wins the lease
    procs.batcher()
    procs.worker("synthetic", 1)
    _run_with_fault(procs, settings, lambda: os.killpg(leader.pid, signal.SIGKILL),
                    "kill -9 batcher")


def test_redis_restart_with_aof_loses_nothing(procs: Procs, settings: Settings,
                                              redis_server: RedisServer) -> None:
    procs.batcher()
    procs.worker("synthetic", 1)
    url = procs.gateway()

    def fault() -> None:
        redis_server.stop()
        r = httpx.post(f"{url}/v1/models/synthetic/jobs", json={"input": {"x": 1}}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
        # Down longer than the liveness lapse: every worker's liveness key has expired when
        # Redis comes back, yet no worker is dead.
        time.sleep(settings.heartbeat_lapse_s + 1)
        redis_server.start()

    load = _run_with_fault(procs, settings, fault, "redis restart", url)
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    with httpx.Client(base_url=url, timeout=30) as client:
        attempts = {client.get(f"/v1/jobs/{j}").json()["metrics"]["attempts"]
                    for j in load.accepted}
    assert attempts == {1}, "a job ran twice: a live worker was taken for dead"


def test_kill_gateway_between_submit_and_answer(procs: Procs, settings: Settings) -> None:
    procs.batcher()
    procs.worker("synthetic", 1)
    first = procs.gateway()
    gateways = [p for p in procs.all if "gateway" in str(p.args)]

    def fault() -> None:
        os.killpg(gateways[0].pid, signal.SIGKILL)

    wait_until(workers_ready(settings, "synthetic", 1), 60, "a worker")
    load = _load(first)
    time.sleep(2)
    fault()
    time.sleep(1)
    load.stop()
    second = procs.gateway()
    _settle(second, settings, load, "kill -9 gateway")
