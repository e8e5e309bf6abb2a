"""Deadlines, ETAs, live events and cancel in every state, through real processes."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from asyncinfer.client import Client, JobEvent
from shared.settings import Settings
from tests.conftest import MODELS, Procs, wait_until

pytestmark = pytest.mark.slow


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _final(url: str, job_id: str, wait_s: float = 30) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", params={"wait": wait_s},
                                     timeout=wait_s + 10).json()
    return body


def _warm(url: str) -> None:
    """Past the start-up probes: the fit is calibrated and batches are shared."""
    r = httpx.post(f"{url}/v1/models/synthetic/jobs:batch",
                   json={"inputs": [{"x": i} for i in range(16)]}, timeout=30)
    for job in r.json()["jobs"]:
        _final(url, job["id"])


def _raw_events(url: str, job_id: str, last: int = 0) -> list[tuple[str, int, dict[str, Any]]]:
    headers = {"last-event-id": str(last)} if last else {}
    out = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif "data" in fields:
                out.append((fields["event"], int(fields["id"]), json.loads(fields["data"])))
                fields = {}
    return out


def test_events_queued_running_final_in_order_resume_and_404(procs: Procs,
                                                            settings: Settings) -> None:
    procs.batcher()
    url = procs.gateway()
    job = httpx.post(f"{url}/v1/models/synthetic/jobs",
                     json={"input": {"x": 3, "sleep_s": 0.5}}, timeout=10).json()["id"]
    seen: list[tuple[str, int, dict[str, Any]]] = []
    reader = threading.Thread(target=lambda: seen.extend(_raw_events(url, job)))
    reader.start()
    time.sleep(0.5)  # connected while the job waits: no worker yet
    procs.worker("synthetic")
    reader.join(60)
    assert [(e, i) for e, i, _ in seen] == [("queued", 1), ("running", 2), ("succeeded", 3)]
    assert seen[0][2]["status"] == "queued" and seen[2][2]["output"] == {"y": 6.0}
    assert seen[1][2]["started_at"] is not None
    # Resuming after what was read sends only the rest.
    assert [(e, i) for e, i, _ in _raw_events(url, job, last=2)] == [("succeeded", 3)]
    # The Python client follows the same way.
    with Client(url) as client:
        assert [e.event for e in client.events(job)] == ["queued", "running", "succeeded"]
    missing = httpx.get(f"{url}/v1/jobs/{'0' * 32}/events", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_another_api_keys_job_has_no_events(procs: Procs, settings: Settings) -> None:
    mine, theirs = "key-mine", "key-theirs"
    digests = json.dumps([hashlib.sha256(k.encode()).hexdigest() for k in (mine, theirs)])
    url = procs.gateway(ASYNCINFER_API_KEYS=digests)
    job = httpx.post(f"{url}/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                     headers={"authorization": f"Bearer {mine}"}, timeout=10).json()["id"]
    foreign = httpx.get(f"{url}/v1/jobs/{job}/events",
                        headers={"authorization": f"Bearer {theirs}"}, timeout=10)
    assert foreign.status_code == 404


def test_a_job_whose_deadline_passes_before_it_starts_expires_unrun(procs: Procs,
                                                                    settings: Settings) -> None:
    procs.batcher()  # no worker: nothing can start it
    url = procs.gateway()
    r = httpx.post(f"{url}/v1/models/synthetic/jobs",
                   json={"input": {"x": 1}, "deadline_ms": 300}, timeout=10)
    assert r.status_code == 202 and r.json()["deadline_at"] is not None
    done = _final(url, r.json()["id"], wait_s=10)
    assert done["status"] == "expired" and done["error"]["type"] == "deadline_exceeded"
    assert done["metrics"]["attempts"] == 0


def test_eta_while_queued_admission_of_deadlines_and_none_accepted_misses(
        procs: Procs, settings: Settings, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MODELS.read_text().replace("max_queue = 500", "max_queue = 5000"))
    env = {"ASYNCINFER_MODELS": str(models)}
    url = procs.serving(**env)
    _warm(url)
    # About 2.5 s of work: 600 jobs in batches of 16 rows at 1 ms/row + 5 ms + 50 ms.
    backlog = httpx.post(f"{url}/v1/models/synthetic/jobs:batch", timeout=30, json={
        "inputs": [{"x": i, "sleep_s": 0.05} for i in range(600)]}).json()["jobs"]
    # The ETA shows the backlog once the fit has followed the new batch times: the batcher
    # republishes its fit about once a second, so that is one to two seconds after the
    # backlog starts (a fixed one-second wait raced the republish and failed one run in four).
    last: dict[str, Any] = {}

    def eta_shows_the_backlog() -> bool:
        last.update(httpx.get(f"{url}/v1/jobs/{backlog[-1]['id']}", timeout=10).json())
        eta = last.get("eta")
        return eta is not None and _epoch(eta["finish_at"]) > time.time() + 0.5

    wait_until(eta_shows_the_backlog, 2.5, "an ETA that shows the backlog")
    assert last["status"] == "queued" and last["eta"]["position"] > 100
    with httpx.Client(base_url=url, timeout=30) as client:
        started = time.monotonic()
        refused = client.post("/v1/models/synthetic/jobs",
                              json={"input": {"x": 1}, "deadline_ms": 200})
        took_ms = (time.monotonic() - started) * 1000
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "deadline_unmeetable"
        assert int(refused.headers["retry-after"]) >= 1
        print(f"deadline_unmeetable answered in {took_ms:.1f} ms: {refused.json()}")
        accepted = []
        for deadline_ms in (3000, 5000, 8000):
            r = client.post("/v1/models/synthetic/jobs",
                            json={"input": {"x": 1}, "deadline_ms": deadline_ms})
            if r.status_code == 202:
                accepted.append((r.json(), deadline_ms))
            else:
                assert r.json()["error"]["type"] == "deadline_unmeetable"
        assert accepted, "no deadline was admitted"
        info = client.get("/v1/models/synthetic").json()
    grace_s = info["a"] + info["b"]
    for job, deadline_ms in accepted:
        done = _final(url, job["id"])
        late_s = _epoch(done["finished_at"]) - _epoch(job["created_at"]) - deadline_ms / 1000
        assert done["status"] == "succeeded" and late_s <= grace_s, (deadline_ms, late_s)
    assert _final(url, backlog[-1]["id"])["eta"] is None  # no ETA once final


def test_cancel_of_a_running_job_ends_canceled_and_its_batch_mates_succeed(
        procs: Procs, settings: Settings) -> None:
    url = procs.serving()
    _warm(url)
    jobs = httpx.post(f"{url}/v1/models/synthetic/jobs:batch", timeout=30, json={
        "inputs": [{"x": i, "sleep_s": 1.0} for i in range(4)]}).json()["jobs"]
    ids = [j["id"] for j in jobs]
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{ids[1]}", timeout=5).json()["status"]
               == "running", 10, "the batch running")
    canceled = httpx.delete(f"{url}/v1/jobs/{ids[1]}", timeout=10)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    done = [_final(url, j) for j in ids]
    assert [d["status"] for d in done] == ["succeeded", "canceled", "succeeded", "succeeded"]
    assert done[1].get("output") is None  # its result was discarded
    assert {d["metrics"]["batch_size"] for d in (done[0], done[2], done[3])} == {4}


def test_client_events_parses_the_stream() -> None:
    from asyncinfer.client import SseParser

    parser = SseParser()
    lines = [": keep-alive", "", "id: 2", "event: running",
             'data: {"id": "j", "model": "m", "status": "running", "created_at": "t"}', ""]
    events = [e for line in lines if (e := parser.feed(line)) is not None]
    assert events == [JobEvent("running", 2, events[0].job)]
    assert events[0].job.status == "running"
