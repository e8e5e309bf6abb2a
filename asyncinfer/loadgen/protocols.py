"""One job, by protocol: how the generator asks for a job and knows it is over.

- `jobs`: POST the submit path; a 202 gives the job, then GET /v1/jobs/{id}?wait=N until it is
  final (a 200 with a final job ends it at once). asyncinfer's own contract.
- `jobs-wait`: the same with `Prefer: wait=N` on the submit, which answers 200 with the finished
  job when it finishes in time: one request per job.
- `submit`: the POST alone; done at its 202 (the gateway's submit path).
- `sync`: one POST whose 200 carries the result (BentoML's synchronous endpoint).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asyncinfer.loadgen.http import RawClient
from shared.jobs import FINAL_STATUSES

PROTOCOLS = ("jobs", "jobs-wait", "submit", "sync")


@dataclass(slots=True)
class Outcome:
    """How one job ended. `status` is the job's final status (`succeeded`, or `failed:<error
    type>` such as `failed:overloaded` for a shed job), `http_<code>` for a refused request,
    `accepted` for a submit alone, or a transport failure (`timeout`, `error`, `unanswered`)."""

    status: str
    batch_size: int | None = None
    requests: int = 1
    detail: str = ""
    spans: tuple[float, float, float] | None = None  # created, started, finished (epoch s)
    job_id: str | None = None


JobFn = Callable[[bytes], Awaitable[Outcome]]


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _final(job: dict[str, Any], requests: int) -> Outcome:
    status = str(job.get("status"))
    if status == "failed":
        error = job.get("error") or {}
        status = f"failed:{error.get('type', '?')}" if isinstance(error, dict) else status
    size = (job.get("metrics") or {}).get("batch_size")
    stamps = [_epoch(job.get(k)) for k in ("created_at", "started_at", "finished_at")]
    created, started, finished = stamps
    spans = ((created, started, finished)
             if created is not None and started is not None and finished is not None else None)
    return Outcome(status, int(size) if isinstance(size, int | float) else None, requests,
                   spans=spans, job_id=job.get("id"))


def _refused(status: int, payload: bytes, requests: int = 1) -> Outcome:
    return Outcome(f"http_{status}", requests=requests,
                   detail=payload[:300].decode(errors="replace"))


def job_protocol(client: RawClient, path: str, wait_s: float, prefer_wait: bool = False) -> JobFn:
    """Submit, then long-poll until final; with `prefer_wait` the submit carries `Prefer:
    wait=N` and usually answers 200 with the finished job."""
    headers = {"Prefer": f"wait={wait_s:g}"} if prefer_wait else None

    async def run(body: bytes) -> Outcome:
        status, payload = await client.request("POST", path, body, headers)
        if status not in (200, 202):
            return _refused(status, payload)
        job = json.loads(payload)
        requests = 1
        while job.get("status") not in FINAL_STATUSES:
            status, payload = await client.request("GET", f"/v1/jobs/{job['id']}?wait={wait_s:g}")
            requests += 1
            if status != 200:
                return _refused(status, payload, requests)
            job = json.loads(payload)
        return _final(job, requests)

    return run


def submit_protocol(client: RawClient, path: str, keep_id: bool = False) -> JobFn:
    """The submit alone: `accepted` at its 200/202 (with the job's id when `keep_id`)."""

    async def run(body: bytes) -> Outcome:
        status, payload = await client.request("POST", path, body)
        if status not in (200, 202):
            return _refused(status, payload)
        return Outcome("accepted", job_id=json.loads(payload)["id"] if keep_id else None)

    return run


def sync_protocol(client: RawClient, path: str) -> JobFn:
    """One POST answered with the result (a peer's synchronous endpoint)."""

    async def run(body: bytes) -> Outcome:
        status, payload = await client.request("POST", path, body)
        return Outcome("succeeded") if status == 200 else _refused(status, payload)

    return run


def make_protocol(name: str, client: RawClient, path: str, wait_s: float) -> JobFn:
    if name in ("jobs", "jobs-wait"):
        return job_protocol(client, path, wait_s, prefer_wait=name == "jobs-wait")
    if name == "submit":
        return submit_protocol(client, path)
    if name == "sync":
        return sync_protocol(client, path)
    raise ValueError(f"unknown protocol {name!r}; one of {', '.join(PROTOCOLS)}")
