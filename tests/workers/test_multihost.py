"""Several hosts without Kubernetes, played on one machine: two autoscalers, each owning its
own CPU slots, serve one model. Together they never run more workers than its max_workers,
and every worker has a name of its own."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import redis

from shared import keys
from shared.settings import Settings
from tests.conftest import Procs, wait_until
from tests.workers.test_autoscaler import worker_pids

pytestmark = pytest.mark.slow

MODELS = """
[models.synthetic]
class = "workers.builtin.synthetic:SyntheticModel"
params = { a_s = 0.001, b_s = 0.005 }
max_batch_size = 16
batch_timeout_s = 4
concurrency_target = 8
scale_down_delay_s = 2
max_workers = 3
"""
MAX_WORKERS = 3


def test_two_autoscalers_stay_within_max_workers_together(procs: Procs, settings: Settings,
                                                          tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    env = {"ASYNCINFER_MODELS": str(models)}
    procs.start("batcher", "batcher", **env)
    # Each alone could start 2 (its own slots): 4 together without a shared count.
    procs.autoscaler("autoscaler-a", ASYNCINFER_DEVICES="cpu:0-1", **env)
    procs.autoscaler("autoscaler-b", ASYNCINFER_DEVICES="cpu:2-3", **env)
    url = procs.gateway(**env)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    peak = {"procs": 0, "beats": 0}
    names: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            beats = [json.loads(v) for v in r.hgetall(keys.workers("synthetic")).values()]
            names.update(b["name"] for b in beats)
            peak["beats"] = max(peak["beats"], len(beats))
            peak["procs"] = max(peak["procs"], len(worker_pids(settings.redis_url)))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        inputs = [{"x": i, "sleep_s": 0.05} for i in range(400)]
        resp = httpx.post(f"{url}/v1/models/synthetic/jobs:batch", json={"inputs": inputs},
                          timeout=30)
        ids = [j["id"] for j in resp.json()["jobs"]]
        done = [httpx.get(f"{url}/v1/jobs/{i}", params={"wait": 90}, timeout=100).json()
                for i in ids]
        wait_until(lambda: not worker_pids(settings.redis_url), 60, "workers drained to zero")
    finally:
        stop.set()
        sampler.join(5)
    assert [d["status"] for d in done] == ["succeeded"] * len(ids)
    assert peak["procs"] <= MAX_WORKERS and peak["beats"] <= MAX_WORKERS, peak
    # The burst wanted 50 workers: both hosts took part (each owns at most 2 slots), and
    # their workers, indexes repeating, still had names of their own.
    served = {d["metrics"]["worker"] for d in done}
    assert len(served) == MAX_WORKERS, served
    devices = {d["metrics"]["device"] for d in done}
    assert devices & {"cpu:0", "cpu:1"} and devices & {"cpu:2", "cpu:3"}, devices
    assert len(names) == len(served)
    print(f"two autoscalers: peak {peak['procs']} worker processes (max_workers "
          f"{MAX_WORKERS}), workers {sorted(served)}")
