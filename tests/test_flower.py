"""Flower watching the real Celery side: a synthetic worker and the batcher as processes, Flower
as a subprocess behind basic auth, a job through the in-process gateway app."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from shared import keys
from shared.procs import free_port, wait_port
from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready
from tests.gateway.test_metrics import PROMTOOL, promtool_problems

AUTH = ("u", "p")
TASK = "asyncinfer.run_batch"


def _get(flower: httpx.Client, path: str, **params: Any) -> Any:
    r = flower.get(path, params=params)
    r.raise_for_status()
    return r.json()


async def test_flower_lists_the_worker_online_and_the_batch_task_succeeded(
        procs: Procs, settings: Settings, client: httpx.AsyncClient) -> None:
    procs.batcher()
    procs.worker("synthetic")
    port = free_port()
    procs.start("flower", "celery", f"--broker={settings.redis_url}", "flower", f"--port={port}",
                "--address=127.0.0.1", f"--basic_auth={AUTH[0]}:{AUTH[1]}")
    wait_until(workers_ready(settings, "synthetic", 1), 60, "a synthetic worker")
    assert wait_port("127.0.0.1", port, 30), procs.logs()
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, auth=AUTH, timeout=10) as flower:
        # Heartbeat events reach Flower a little after it connects: poll, bounded.
        def online() -> list[str]:
            status = _get(flower, "/api/workers", status=1)
            return [name for name, alive in status.items()
                    if alive and name.startswith("synthetic-1-cpu0@")]

        wait_until(lambda: bool(online()), 30, "Flower to see the worker online")
        worker = online()[0]

        def batch_tasks() -> list[dict[str, Any]]:
            tasks = _get(flower, "/api/tasks", taskname=TASK, state="SUCCESS")
            return [t for t in tasks.values() if t["worker"] == worker]

        # Task events are off in the worker's configuration; Flower switches them on by remote
        # control every few seconds, so a job run before its first switch goes unrecorded.
        # Submit one job a second until Flower has recorded one (bounded).
        for _ in range(30):
            r = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 2}},
                                  headers={"Prefer": "wait=30"})
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            if batch_tasks():
                break
            await asyncio.sleep(1)
        wait_until(lambda: bool(batch_tasks()), 10, "Flower to record the batch task")
        task = batch_tasks()[0]
        assert task["name"] == TASK and task["state"] == "SUCCESS"
        assert task["received"] is not None and task["started"] is not None

        inspected = _get(flower, "/api/workers", refresh=1, workername=worker)[worker]
        queues = [q["name"] for q in inspected["active_queues"]]
        # Each worker process consumes its own queue: the batcher routes batches to it.
        assert queues == [keys.worker_queue("synthetic", worker)]

    assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401  # auth is on
    # By Flower's design these two stay open even with basic auth (docs/operations.md).
    assert httpx.get(f"{base}/healthcheck", timeout=10).text == "OK"
    flower_metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert "flower_events_total" in flower_metrics
    if PROMTOOL:  # Flower is the other process serving /metrics (the gateway's: test_metrics)
        assert promtool_problems(flower_metrics) == ""
