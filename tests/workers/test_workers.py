"""Device-pinned workers through real processes: indexes and devices, predict concurrency,
failure isolation, kill -9, drain on SIGTERM and the batch time limit."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
from typing import Any

import httpx
import pytest
import redis

from shared import keys
from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready
from workers.process import STUCK_EXIT_CODE

pytestmark = pytest.mark.slow


def _heartbeats(settings: Settings, model: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return [json.loads(v) for v in r.hgetall(keys.workers(model)).values()]


def _xrange(r: redis.Redis, stream: str) -> list[tuple[str, dict[str, str]]]:
    entries: list[tuple[str, dict[str, str]]] = r.xrange(stream)  # type: ignore[assignment]
    return entries


def _jobs(url: str, inputs: list[dict[str, Any]]) -> list[str]:
    r = httpx.post(f"{url}/v1/models/synthetic/jobs:batch", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 202, r.text
    return [j["id"] for j in r.json()["jobs"]]


def _final(url: str, ids: list[str], wait_s: float = 60) -> list[dict[str, Any]]:
    out = []
    for job_id in ids:
        body = httpx.get(f"{url}/v1/jobs/{job_id}", params={"wait": wait_s}, timeout=wait_s + 10)
        out.append(body.json())
    return out


def _status(url: str, job_id: str) -> str:
    status: str = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"]
    return status


def test_two_workers_get_distinct_index_device_cores_and_share_batches(
        procs: Procs, settings: Settings) -> None:
    procs.batcher()
    procs.worker("synthetic", 1)
    procs.worker("synthetic", 2)
    url = procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 2), 60, "two workers")
    beats = sorted(_heartbeats(settings, "synthetic"), key=lambda b: b["index"])
    assert [b["index"] for b in beats] == [1, 2]
    assert [b["device"] for b in beats] == ["cpu:0", "cpu:1"]
    assert beats[0]["cores"] != beats[1]["cores"] and all(len(b["cores"]) == 1 for b in beats)
    done = _final(url, _jobs(url, [{"x": i, "sleep_s": 0.05} for i in range(120)]))
    assert all(d["status"] == "succeeded" for d in done)
    used = {d["metrics"]["worker"].split("@")[0] for d in done}
    assert used == {"synthetic-1-cpu0", "synthetic-2-cpu1"}
    # Job metrics name the slot that ran each job, as the heartbeats do.
    assert {(d["metrics"]["worker"].split("@")[0], d["metrics"]["device"]) for d in done} == {
        ("synthetic-1-cpu0", "cpu:0"), ("synthetic-2-cpu1", "cpu:1")}


def test_predict_concurrency_one_never_overlaps_predicts_but_preprocess_overlaps(
        procs: Procs, settings: Settings) -> None:
    url = procs.serving()
    done = _final(url, _jobs(url, [{"x": i, "sleep_s": 0.2, "pre_sleep_s": 0.1}
                                   for i in range(40)]))
    assert all(d["status"] == "succeeded" for d in done)
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    spans = [json.loads(f["spans"]) for _, f in _xrange(r, keys.completions("synthetic"))]
    predicts = sorted(tuple(p) for s in spans for p in s["predict"])
    assert len(predicts) >= 3
    for (_, end), (start, _) in itertools.pairwise(predicts):
        assert start >= end, "two predicts ran at once"
    overlapping = [p for p in (tuple(s["preprocess"][0]) for s in spans)
                   if any(p[0] < e and s < p[1] for s, e in predicts)]
    assert overlapping, "no preprocess ran while another batch predicted"


def test_poison_predict_is_bisected_and_fails_alone(procs: Procs, settings: Settings) -> None:
    url = procs.gateway()
    inputs: list[dict[str, Any]] = [{"x": i} for i in range(60)]
    inputs[45]["fail"] = "predict"
    ids = _jobs(url, inputs)
    procs.batcher()
    procs.worker("synthetic")
    done = _final(url, ids)
    assert [d["status"] for d in done].count("failed") == 1
    bad = done[45]
    assert bad["status"] == "failed" and bad["error"]["type"] == "predict_error"
    assert bad["metrics"]["batch_size"] > 1, "the bad item was not in a shared batch"
    assert all(d["output"] == {"y": 2.0 * i} for i, d in enumerate(done) if i != 45)


def test_worker_killed_mid_batch_loses_nothing(procs: Procs, settings: Settings) -> None:
    procs.batcher()
    victim = procs.worker("synthetic", 1)
    url = procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 1), 60, "worker")
    ids = _jobs(url, [{"x": i, "sleep_s": 1.5} for i in range(6)])
    wait_until(lambda: any(_status(url, j) == "running" for j in ids), 30, "a running batch")
    os.killpg(victim.pid, signal.SIGKILL)
    procs.worker("synthetic", 2)
    done = _final(url, ids, wait_s=90)
    assert [d["status"] for d in done] == ["succeeded"] * 6
    assert max(d["metrics"]["attempts"] for d in done) == 2  # the killed batch ran again
    stats = redis.Redis.from_url(settings.redis_url, decode_responses=True).hgetall(
        keys.stats("synthetic"))
    assert stats == {"succeeded": "6"}, "a final state was written more than once"
    print(f"kill -9 mid-batch: 6 accepted, 6 succeeded once, attempts="
          f"{[d['metrics']['attempts'] for d in done]}")


def test_job_that_kills_workers_is_dead_lettered_and_mates_succeed(
        procs: Procs, settings: Settings) -> None:
    url = procs.gateway()
    inputs: list[dict[str, Any]] = [{"x": i} for i in range(5)]
    inputs[2]["fail"] = "kill"
    ids = _jobs(url, inputs)
    procs.batcher()
    worker = procs.worker("synthetic")
    restarts = 0
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    def settled() -> bool:
        nonlocal worker, restarts
        if worker.poll() is not None:  # what a launcher does: restart the crashed worker
            restarts += 1
            worker = procs.worker("synthetic")
        return all(_status(url, j) in ("succeeded", "failed") for j in ids)

    wait_until(settled, 120, "every job final")
    done = _final(url, ids)
    assert [d["status"] for d in done] == ["succeeded", "succeeded", "failed", "succeeded",
                                           "succeeded"]
    assert done[2]["error"]["type"] == "poison"
    dead = _xrange(r, keys.dead_letters("synthetic"))
    assert [f["job"] for _, f in dead] == [ids[2]]
    assert restarts >= settings.max_attempts


def test_sigterm_drains_the_running_batch_then_exits(procs: Procs, settings: Settings) -> None:
    procs.batcher()
    worker = procs.worker("synthetic")
    url = procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 1), 60, "worker")
    ids = _jobs(url, [{"x": i, "sleep_s": 2.0} for i in range(3)])
    wait_until(lambda: any(_status(url, j) == "running" for j in ids), 30, "a batch running")
    running = [j for j in ids if _status(url, j) == "running"]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    after = {j: _status(url, j) for j in ids}
    # What was running finished; nothing was left half-done; nothing new was taken.
    assert all(after[j] == "succeeded" for j in running)
    assert set(after.values()) <= {"succeeded", "queued"} and "queued" in after.values()
    assert _heartbeats(settings, "synthetic") == []


def test_a_hanging_item_fails_alone_with_timeout_and_its_batch_mates_succeed(
        procs: Procs, settings: Settings) -> None:
    procs.batcher()
    worker = procs.worker("synthetic")
    url = procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 1), 60, "worker")
    # Past the start-up probes (batches of 1, 1, 1, 2, 3 rows): the next batch is shared.
    _final(url, _jobs(url, [{"x": i} for i in range(12)]))
    inputs: list[dict[str, Any]] = [{"x": i, "sleep_s": 0.2} for i in range(4)]
    inputs[1]["fail"] = "hang"
    ids = _jobs(url, inputs)
    exits: list[int] = []

    def settled() -> bool:
        nonlocal worker
        if worker.poll() is not None:  # what a launcher does: restart the exited worker
            exits.append(worker.returncode)
            worker = procs.worker("synthetic")
        return all(_status(url, j) in ("succeeded", "failed") for j in ids)

    wait_until(settled, 120, "every job final")
    done = _final(url, ids)
    assert [d["status"] for d in done] == ["succeeded", "failed", "succeeded", "succeeded"]
    assert done[1]["error"]["type"] == "timeout"
    # predict is stuck in a thread nobody can stop: the worker exits for its launcher to
    # restart, once in the shared batch and once with the hanging item alone.
    assert exits == [STUCK_EXIT_CODE, STUCK_EXIT_CODE]
    assert {d["metrics"]["attempts"] for i, d in enumerate(done) if i != 1} == {2}
    [after] = _final(url, _jobs(url, [{"x": 4}]))
    assert after["status"] == "succeeded" and after["output"] == {"y": 8.0}


def test_a_lone_job_that_hangs_is_given_up_by_the_heartbeat_and_fails_alone_with_timeout(
        procs: Procs, settings: Settings) -> None:
    """A batch of one on an idle worker runs on the compute thread with no event loop to time
    it (workers.direct): the heartbeat's watchdog gives up on it. Without that the job would
    stay running forever, its entry kept fresh by a live worker."""
    procs.batcher()
    worker = procs.worker("synthetic")
    url = procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 1), 60, "worker")
    _final(url, _jobs(url, [{"x": i} for i in range(6)]))  # past the start-up probes
    [job_id] = _jobs(url, [{"x": 1, "fail": "hang"}])
    exits: list[int] = []

    def settled() -> bool:
        nonlocal worker
        if worker.poll() is not None:
            exits.append(worker.returncode)
            worker = procs.worker("synthetic")
        return _status(url, job_id) in ("succeeded", "failed")

    wait_until(settled, 120, "the job final")
    if len(exits) == 1:  # the lone suspect's timeout is written just before its worker exits
        exits.append(worker.wait(30))
        worker = procs.worker("synthetic")
    [done] = _final(url, [job_id])
    assert done["status"] == "failed" and done["error"]["type"] == "timeout"
    # Given up once on the direct path, then once more run alone as a suspect (the loop's).
    assert exits == [STUCK_EXIT_CODE, STUCK_EXIT_CODE]
    given_up = re.findall(r"batch stuck past its time limit.* solo=(\w+) path=(\w+)",
                          (procs.log_dir / "worker-synthetic-1.log").read_text())
    assert given_up == [("False", "direct"), ("True", "loop")]
    [after] = _final(url, _jobs(url, [{"x": 4}]))
    assert after["status"] == "succeeded"
