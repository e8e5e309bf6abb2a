"""The dispatch protocol through real processes, with the default timers users get (heartbeat
1 s, liveness lapse 3 s, lease 5 s): a killed worker's batch is final within seconds, a long
batch is never run twice, a paused leader is fenced, and entries of two priority streams with
the same id never collide."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from asyncinfer.loadgen import SteadyLoad
from shared import keys
from shared.answerleg import MAX_SAMPLE_MS
from shared.redisserver import RedisServer
from shared.settings import Settings
from tests.conftest import MODELS, Procs, wait_until, workers_ready
from tests.test_chaos import _settle

pytestmark = pytest.mark.slow


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _jobs(url: str, ids: list[str]) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for job_id in ids:
            out.append(client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json())
    return out


def _running_on(url: str, ids: list[str], worker: str) -> bool:
    with httpx.Client(base_url=url, timeout=10) as client:
        for job_id in ids[-20:]:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["metrics"]["worker"].startswith(worker):
                return True
    return False


def test_kill_9_of_a_worker_mid_batch_its_jobs_are_final_within_10_s_and_others_serve_on(
        procs: Procs, settings: Settings) -> None:
    procs.batcher()
    victim = procs.worker("synthetic", 1)
    procs.worker("synthetic", 2)
    url = procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 2), 60, "two workers")
    load = SteadyLoad(url, "synthetic", lambda n: {"x": n, "sleep_s": 0.1}, 25).start()
    time.sleep(2)
    wait_until(lambda: _running_on(url, load.accepted, "synthetic-1-"), 10,
               "a batch running on the victim")
    killed_at = time.time()
    os.killpg(victim.pid, signal.SIGKILL)
    procs.worker("synthetic", 1)  # what the launcher does
    time.sleep(6)
    load.stop()
    _settle(url, settings, load, "kill -9 worker, default timers")
    done = _jobs(url, load.accepted)
    rerun = [j for j in done if j["metrics"]["attempts"] > 1]
    assert rerun, "the kill hit no batch"
    late = [_epoch(j["finished_at"]) - killed_at for j in rerun]
    print(f"killed batch: {len(rerun)} jobs final {min(late):.2f}..{max(late):.2f} s after "
          "the kill")
    assert max(late) <= 10.0
    # The other worker never stopped: its finishes have no gap while the victim was replaced.
    other = sorted(_epoch(j["finished_at"]) for j in done
                   if j["metrics"]["worker"].startswith("synthetic-2-")
                   and killed_at <= _epoch(j["finished_at"]) <= killed_at + 5)
    gaps = [b - a for a, b in zip([killed_at, *other], other, strict=False)]
    assert other and max(gaps) < 1.5, gaps


def test_a_batch_longer_than_any_reclaim_threshold_runs_once(
        procs: Procs, settings: Settings, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS.read_text().replace("batch_timeout_s = 4", "batch_timeout_s = 30"))
    env = {"ASYNCINFER_MODELS": str(models)}
    url = procs.serving(**env)
    with httpx.Client(base_url=url, timeout=60) as client:
        # 9 s: three liveness lapses and past the stale-entry threshold (two lapses); the
        # second job waits behind it, staged in the same worker.
        slow = client.post("/v1/models/synthetic/jobs",
                           json={"input": {"x": 1, "sleep_s": 9}}).json()["id"]
        time.sleep(0.5)
        behind = client.post("/v1/models/synthetic/jobs",
                             json={"input": {"x": 2}}).json()["id"]
    done = _jobs(url, [slow, behind])
    assert [j["status"] for j in done] == ["succeeded", "succeeded"]
    assert [j["metrics"]["attempts"] for j in done] == [1, 1]
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    assert r.hgetall(keys.stats("synthetic")) == {"succeeded": "2"}


def test_a_redis_restart_longer_than_the_lapse_kills_no_worker(
        procs: Procs, settings: Settings, tmp_path: Path, redis_server: RedisServer) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS.read_text().replace("batch_timeout_s = 4", "batch_timeout_s = 30"))
    env = {"ASYNCINFER_MODELS": str(models)}
    procs.start("batcher", "batcher", **env)
    for index in ("1", "2"):  # a second, idle worker: where a presumed-dead batch would rerun
        procs.start(f"worker-{index}", "workers", "--model", "synthetic", "--index", index,
                    **env)
    url = procs.gateway(**env)
    wait_until(workers_ready(settings, "synthetic", 2), 60, "two workers")
    with httpx.Client(base_url=url, timeout=60) as client:
        job = client.post("/v1/models/synthetic/jobs",
                          json={"input": {"x": 1, "sleep_s": 8}}).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "running", 10,
                   "the job running")
    redis_server.stop()
    # Every liveness key has expired by the time Redis is back (it keeps their expiry).
    time.sleep(settings.heartbeat_lapse_s + 1)
    redis_server.start()
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 30, "ready")
    [done] = _jobs(url, [job])
    assert done["status"] == "succeeded" and done["metrics"]["attempts"] == 1
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    assert r.hgetall(keys.stats("synthetic")) == {"succeeded": "1"}


def test_a_paused_leader_is_fenced_no_job_runs_twice_and_none_is_lost(
        procs: Procs, settings: Settings) -> None:
    leader = procs.batcher()
    time.sleep(1)  # the first one wins the leases
    procs.batcher()
    procs.worker("synthetic", 1)
    url = procs.gateway()
    wait_until(workers_ready(settings, "synthetic", 1), 60, "a worker")
    load = SteadyLoad(url, "synthetic", lambda n: {"x": n, "sleep_s": 0.02}, 25).start()
    time.sleep(2)
    stopped_at = time.time()
    os.killpg(leader.pid, signal.SIGSTOP)
    time.sleep(settings.lease_ttl_s + 3)  # past the lease: the standby takes over
    resumed_at = time.time()
    os.killpg(leader.pid, signal.SIGCONT)  # it must find its term over and change nothing
    time.sleep(3)
    load.stop()
    _settle(url, settings, load, "SIGSTOP leader past its lease")
    done = _jobs(url, load.accepted)
    assert {j["metrics"]["attempts"] for j in done} == {1}, "a job ran twice"
    during = [j for j in done if stopped_at <= _epoch(j["created_at"]) <= resumed_at]
    waits = [j["metrics"]["queue_ms"] / 1000 for j in during]
    print(f"submitted while the leader was stopped: {len(during)} jobs, longest queue wait "
          f"{max(waits):.2f} s")
    assert during and max(waits) <= settings.lease_ttl_s + 3.0


def _same_id_next(r: redis.Redis, streams: list[str]) -> None:
    """Make the next XADD of each stream take the same id: both last ids at one future
    instant (the entry is deleted at once; the stream keeps its last id)."""
    future_ms = int(time.time() * 1000) + 300
    for stream in streams:
        r.xadd(stream, {"seed": "1"}, id=f"{future_ms}-0")
        r.xdel(stream, f"{future_ms}-0")


def test_jobs_with_the_same_entry_id_in_two_priority_streams_both_run_and_cancel_spares_one(
        procs: Procs, settings: Settings) -> None:
    procs.batcher()
    url = procs.gateway()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    pair = [keys.stream("synthetic", "high"), keys.stream("synthetic", "normal")]
    with httpx.Client(base_url=url, timeout=60) as client:
        def submit(priority: str) -> str:
            return str(client.post("/v1/models/synthetic/jobs", json={
                "input": {"x": 1}, "priority": priority}).json()["id"])

        _same_id_next(r, pair)
        both = [submit("high"), submit("normal")]
        _same_id_next(r, pair)
        kept, canceled = submit("high"), submit("normal")
        entries = [r.hget(keys.job(j), "entry") for j in [*both, kept, canceled]]
        assert entries[0] == entries[1] and entries[2] == entries[3], entries
        time.sleep(1.5)  # the batcher holds all four in its read-ahead (no worker yet)
        assert client.delete(f"/v1/jobs/{canceled}").json()["status"] == "canceled"
        procs.worker("synthetic")
        done = _jobs(url, [*both, kept, canceled])
    assert [j["status"] for j in done] == ["succeeded", "succeeded", "succeeded", "canceled"]


def test_the_simulator_and_the_live_system_agree_on_batch_sizes_at_half_load(
        procs: Procs, settings: Settings, tmp_path: Path) -> None:
    from batcher.cork import CorkPolicy
    from batcher.policy import PolicyConfig
    from batcher.simulate import Arrival, CostModel, simulate

    a_s, b_s, max_rows, budget_ms = 0.002, 0.020, 32, 250
    models = tmp_path / "models.toml"
    models.write_text(f"""
[models.synthetic]
class = "workers.builtin.synthetic:SyntheticModel"
params = {{ a_s = {a_s}, b_s = {b_s} }}
max_batch_size = {max_rows}
max_latency_ms = {budget_ms}
""")
    env = {"ASYNCINFER_MODELS": str(models)}
    url = procs.serving(**env)
    capacity = max_rows / (a_s * max_rows + b_s)
    rate = 0.5 * capacity
    warm = SteadyLoad(url, "synthetic", lambda n: {"x": n}, rate).start()
    time.sleep(4)  # past the probes: the fit settles
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    def rows() -> dict[int, int]:
        raw = r.get(keys.batcher_state("synthetic"))
        return {int(k): v for k, v in json.loads(raw)["batch_rows"].items()} if raw else {}

    before = rows()
    time.sleep(8)
    after = rows()
    state = json.loads(r.get(keys.batcher_state("synthetic")) or "{}")
    warm.stop()
    counts = {n: after.get(n, 0) - before.get(n, 0) for n in after}
    live = sum(n * c for n, c in counts.items()) / max(1, sum(counts.values()))
    lead_s = state["lead_ms"] / 1000
    tail_s = max(0.0, state["overhead_s"] - lead_s)
    cost = CostModel(state["a_s"], state["b_s"], 0.0, lead_s, tail_s)
    trace = [Arrival(i / rate) for i in range(int(rate * 8))]
    sim = simulate(lambda cfg, clock, slots: CorkPolicy(cfg, clock), trace, cost,
                   PolicyConfig(max_rows, budget_ms), slots=1)
    print(f"half load ({rate:.0f}/s): live mean batch {live:.2f} rows, simulator "
          f"{sim.mean_batch_rows:.2f} (fit a={1000 * state['a_s']:.2f} ms "
          f"b={1000 * state['b_s']:.2f} ms lead={1000 * lead_s:.2f} ms)")
    assert abs(sim.mean_batch_rows - live) <= 0.2 * live


def test_the_answer_leg_the_gateway_measures_reaches_the_batcher(
        procs: Procs, settings: Settings) -> None:
    url = procs.serving()
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    def state() -> dict[str, Any]:
        raw = r.get(keys.batcher_state("synthetic"))
        return json.loads(raw) if raw else {}

    def answered(n: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(n):  # each client waits: each answer measures the leg
                resp = client.post("/v1/models/synthetic/jobs", json={"input": {"x": i}},
                                   headers={"Prefer": "wait=10"})
                assert resp.status_code == 200, resp.text

    answered(40)  # past the least a gateway publishes (answerleg.MIN_SAMPLES)
    wait_until(lambda: state().get("answer_leg_ms", 0) > 0, 10, "the answer leg in the state")
    assert state()["answer_leg_ms"] < MAX_SAMPLE_MS


@pytest.fixture(autouse=True)
def _no_stopped_children(procs: Procs) -> Any:
    yield
    for proc in procs.all:  # a SIGSTOPped process ignores SIGTERM until continued
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)

