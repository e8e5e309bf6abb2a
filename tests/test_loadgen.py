"""The load generator (asyncinfer.loadgen) against a small fake of the job API in this event
loop: arrivals, protocols, outcomes, goodput, latency from the schedule, and SteadyLoad."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from asyncinfer.loadgen import Config, SteadyLoad, run
from asyncinfer.loadgen.cli import main as loadgen_main
from shared.procs import free_port


@dataclass
class FakeJobs:
    """Jobs per the contract's shapes. The input says how each behaves: `delay_ms` (time to
    finish), `fail` (an error type: the job fails with it), `refuse` (429), `drop` (the
    connection closes with no answer)."""

    port: int = 0
    jobs: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    submits: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def final(self, job_id: str) -> dict[str, Any]:
        _, spec = self.jobs[job_id]
        job: dict[str, Any] = {"id": job_id, "status": "succeeded", "metrics": {"batch_size": 1}}
        if spec.get("fail"):
            job.update(status="failed", error={"type": spec["fail"], "message": "x"})
        return job

    async def answer(self, method: str, path: str, headers: dict[str, str],
                     body: bytes) -> tuple[int, dict[str, Any]] | None:
        if method == "POST" and path == "/predict":
            return 200, {"y": 1}
        if method == "POST":
            spec = json.loads(body)["input"]
            if spec.get("drop"):
                return None
            if spec.get("refuse"):
                return 429, {"error": {"type": "queue_full", "message": "full"}}
            self.submits += 1
            job_id = f"job-{self.submits}"
            self.jobs[job_id] = (time.monotonic() + spec.get("delay_ms", 0) / 1000, spec)
            if "prefer" in headers:
                await asyncio.sleep(max(0.0, self.jobs[job_id][0] - time.monotonic()))
                return 200, self.final(job_id)
            return 202, {"id": job_id, "status": "queued"}
        job_id = path.split("/")[3].split("?")[0]
        await asyncio.sleep(max(0.0, self.jobs[job_id][0] - time.monotonic()))
        return 200, self.final(job_id)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
                method, path, _ = head[0].split(" ")
                headers = {k.lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in head[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                answer = await self.answer(method, path, headers, body)
                if answer is None:
                    return
                status, payload = answer
                data = json.dumps(payload).encode()
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                             % (status, len(data), data))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeJobs]:
    jobs = FakeJobs()
    server = await asyncio.start_server(jobs.serve, "127.0.0.1", 0)
    jobs.port = server.sockets[0].getsockname()[1]
    async with server:
        yield jobs


def body(**spec: Any) -> bytes:
    return json.dumps({"input": spec}).encode()


def config(fake: FakeJobs, **kw: Any) -> Config:
    defaults: dict[str, Any] = {"url": fake.url, "path": "/v1/models/m/jobs", "warmup_s": 0.0,
                                "drain_s": 5.0, "timeout_s": 5.0}
    return Config(**(defaults | kw))


async def test_open_loop_at_a_fixed_rate_follows_every_job_to_its_end(fake: FakeJobs) -> None:
    cfg = config(fake, arrivals="fixed", rate=50, duration_s=1.0, slo_ms=1000)
    r = await run(cfg, lambda i: body(delay_ms=30), progress=None)
    assert r["arrived"] == 50 and r["status_counts"] == {"succeeded": 50}
    assert r["requests"] == 100  # the submit and one long-poll each
    assert 30 <= r["latency_ms"]["p50"] < 500
    assert r["goodput_per_s"] == pytest.approx(50) and r["batch_size"]["mean"] == 1


async def test_goodput_counts_only_jobs_within_the_slo(fake: FakeJobs) -> None:
    cfg = config(fake, arrivals="fixed", rate=40, duration_s=1.0, slo_ms=100)
    r = await run(cfg, lambda i: body(delay_ms=300 if i % 2 else 0), progress=None)
    assert r["throughput_per_s"] > 30 and r["goodput_per_s"] == pytest.approx(20)
    assert r["within_slo_fraction"] == pytest.approx(0.5)


async def test_latency_counts_from_the_scheduled_arrival(fake: FakeJobs) -> None:
    """A generator that falls behind must not hide it: jobs issued late count the delay."""
    stalled = False

    def slow_first(i: int) -> bytes:
        nonlocal stalled
        if not stalled:
            stalled = True
            time.sleep(0.25)  # the generator stalls before it issues the first jobs
        return body()

    cfg = config(fake, arrivals="fixed", rate=40, duration_s=1.0)
    r = await run(cfg, slow_first, progress=None)
    assert r["status_counts"] == {"succeeded": 40}
    assert r["latency_ms"]["max"] >= 200 and r["issue_lag_ms"]["max"] >= 150


async def test_closed_loop_with_prefer_wait_is_one_request_per_job(fake: FakeJobs) -> None:
    cfg = config(fake, mode="closed", concurrency=1, protocol="jobs-wait", duration_s=0.5)
    r = await run(cfg, lambda i: body(delay_ms=20), progress=None)
    assert 5 <= r["completed"] <= 25 and r["requests"] == r["jobs_total"]
    assert r["latency_ms"]["p50"] >= 20


async def test_outcomes_name_shed_jobs_refusals_and_dead_servers(fake: FakeJobs) -> None:
    bodies = [body(), body(fail="overloaded"), body(refuse=True)]
    cfg = config(fake, arrivals="fixed", rate=30, duration_s=1.0)
    r = await run(cfg, lambda i: bodies[i % 3], progress=None)
    assert r["status_counts"] == {"succeeded": 10, "failed:overloaded": 10, "http_429": 10}
    assert "queue_full" in r["error_samples"]["http_429"]
    dead = Config(url=f"http://127.0.0.1:{free_port()}", path="/v1/models/m/jobs",
                  arrivals="fixed", rate=10, duration_s=0.5, warmup_s=0)
    r = await run(dead, lambda i: body(), progress=None)
    assert r["status_counts"] == {"unreachable": 5} and r["throughput_per_s"] == 0


async def test_sync_protocol_drives_a_peer_endpoint(fake: FakeJobs) -> None:
    cfg = config(fake, path="/predict", protocol="sync", mode="closed", concurrency=4,
                 duration_s=0.3)
    r = await run(cfg, lambda i: b'{"features": [[0.0]]}', progress=None)
    assert set(r["status_counts"]) == {"succeeded"} and r["requests"] == r["jobs_total"]


async def test_steady_load_keeps_the_id_of_every_accepted_job(fake: FakeJobs) -> None:
    load = SteadyLoad(fake.url, "m", lambda n: {"refuse": n % 4 == 3}, rate_per_s=40).start()
    await asyncio.sleep(1.0)
    await asyncio.to_thread(load.stop)
    assert len(load.accepted) == fake.submits == len(set(load.accepted)) >= 20
    assert load.refused["429"] == pytest.approx(len(load.accepted) / 3, abs=2)
    assert load.unanswered == 0


async def test_steady_load_counts_submits_left_unanswered(fake: FakeJobs) -> None:
    """A submit whose connection dies unanswered may have been queued: it is counted apart."""
    load = SteadyLoad(fake.url, "m", lambda n: {"drop": True}, rate_per_s=20).start()
    await asyncio.sleep(0.5)
    await asyncio.to_thread(load.stop)
    assert load.accepted == [] and load.unanswered == sum(load.refused.values()) >= 5


def test_the_command_refuses_a_load_that_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        loadgen_main(["--url", "http://127.0.0.1:1", "--model", "m", "--rate", "0",
                      "--duration", "1"])
    assert exit_.value.code == 2 and "must be positive" in capsys.readouterr().err


async def test_a_request_that_times_out_is_a_timeout_and_never_sent_again(
        fake: FakeJobs) -> None:
    """TimeoutError is an OSError: caught as a dropped keep-alive connection, a timed-out
    submit on a reused connection was sent a second time (a second job on the server) and
    counted as an error."""
    cfg = config(fake, mode="closed", concurrency=1, protocol="jobs-wait", duration_s=0.3,
                 timeout_s=0.2, drain_s=1.0)
    r = await run(cfg, lambda i: body(delay_ms=0 if i == 0 else 2000), progress=None)
    assert r["status_counts"].get("timeout", 0) >= 1, r["status_counts"]
    assert fake.submits == r["jobs_total"], (fake.submits, r["jobs_total"])
