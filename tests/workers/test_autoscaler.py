"""The autoscaler with real processes: a burst wakes workers from zero, they drain after."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready

pytestmark = pytest.mark.slow


def worker_pids(redis_url: str) -> set[int]:
    """Worker processes of this test's system (matched by the Redis URL in their environment)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"workers" in cmd and b"--model" in cmd and redis_url.encode() in env:
            pids.add(int(entry.name))
    return pids


def test_burst_scales_up_from_zero_then_drains_to_zero(procs: Procs, settings: Settings) -> None:
    assert worker_pids(settings.redis_url) == set()
    procs.batcher()
    scaler = procs.start("autoscaler", "workers.autoscaler")
    url = procs.gateway()
    inputs = [{"x": i, "sleep_s": 0.1} for i in range(200)]
    r = httpx.post(f"{url}/v1/models/synthetic/jobs:batch", json={"inputs": inputs}, timeout=30)
    ids = [j["id"] for j in r.json()["jobs"]]
    wait_until(workers_ready(settings, "synthetic", 2), 90, "two workers serving the burst")
    peak = len(worker_pids(settings.redis_url))
    done = [httpx.get(f"{url}/v1/jobs/{i}", params={"wait": 60}, timeout=70).json()
            for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * len(ids)
    assert {d["metrics"]["worker"].split("@")[0] for d in done} == {"synthetic-1-cpu0",
                                                                   "synthetic-2-cpu1"}
    assert {d["metrics"]["device"] for d in done} == {"cpu:0", "cpu:1"}
    # scale_down_delay_s is 1 in tests/models.toml: one worker drains per second of idleness.
    wait_until(lambda: not worker_pids(settings.redis_url), 60, "workers drained to zero")
    models = httpx.get(f"{url}/v1/models/synthetic", timeout=10).json()
    actions = [d["action"] for d in models["autoscaler"]]
    assert "up" in actions and actions.count("down") >= 2
    os.kill(scaler.pid, signal.SIGTERM)
    assert scaler.wait(30) == 0
    assert worker_pids(settings.redis_url) == set()
    print(f"autoscaler: peak workers={peak}, 200 jobs succeeded, drained to 0")


def test_stopping_the_autoscaler_stops_its_workers(procs: Procs, settings: Settings) -> None:
    procs.batcher()
    scaler = procs.start("autoscaler", "workers.autoscaler")
    url = procs.gateway()
    httpx.post(f"{url}/v1/models/synthetic/jobs", json={"input": {"x": 1, "sleep_s": 30}},
               timeout=10)
    wait_until(lambda: bool(worker_pids(settings.redis_url)), 60, "a worker")
    os.kill(scaler.pid, signal.SIGKILL)  # even a kill -9 leaves no orphan (PDEATHSIG)
    wait_until(lambda: not worker_pids(settings.redis_url), 30, "no orphan workers")
