"""The job record: its public JSON shape (DESIGN §7) and its layout in a Redis hash."""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "expired"})
Priority = Literal["high", "normal", "low"]


class JobMetrics(BaseModel):
    queue_ms: float | None = None
    run_ms: float | None = None
    batch_size: int | None = None
    worker: str | None = None
    device: str | None = None
    device_uuid: str | None = None  # on a GPU: the physical device (GPU-... or MIG-...)
    attempts: int = 0


class JobEta(BaseModel):
    """While a job is queued: rows ahead of it, and its predicted start and finish."""

    position: int
    start_at: str
    finish_at: str


class JobError(BaseModel):
    type: str
    message: str


class Job(BaseModel):
    """A job as the HTTP API shows it."""

    id: str
    model: str
    status: Status
    priority: Priority = "normal"
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = None
    deadline_at: str | None = None
    output: Any = None
    error: JobError | None = None
    eta: JobEta | None = None
    metrics: JobMetrics = Field(default_factory=JobMetrics)
    # Its order in the queue (epoch ms: deadline, else submit + max_latency_ms); not shown.
    due_ms: int | None = Field(None, exclude=True)

    def public(self) -> dict[str, Any]:
        """JSON body: `output` only once succeeded, `error` only once failed."""
        body = self.model_dump(exclude={"output", "error"})
        if self.status == "succeeded":
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error.model_dump()
        return body


def new_job_id() -> str:
    """128 random bits as hex, as uuid4().hex but without building a UUID (a third the cost)."""
    return os.urandom(16).hex()


def now_ms() -> int:
    """Wall-clock epoch milliseconds: for records other processes read, never for durations."""
    return int(time.time() * 1000)


@functools.lru_cache(maxsize=1024)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso(ms: str | int | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds; every job read formats four, and
    the date part repeats within a second, so it is cached."""
    if ms in (None, ""):
        return None
    second, milli = divmod(int(ms), 1000)
    return f"{_iso_second(second)}.{milli:03d}+00:00"


def _num(raw: str | None) -> float | None:
    return None if raw in (None, "") else float(raw)


def from_hash(fields: dict[str, str], now: int | None = None) -> Job:
    """Build a Job from its Redis hash. A queued job past its expiry reads as `expired`."""
    status = fields["status"]
    expires_ms = fields.get("expires_ms")
    if status == "queued" and expires_ms and int(expires_ms) <= (now or now_ms()):
        status = "expired"
    error = json.loads(fields["error"]) if fields.get("error") else None
    if status == "expired" and error is None:
        error = {"type": "expired", "message": "the job waited longer than its ttl_s"}
    batch_size = _num(fields.get("batch_size"))
    return Job(
        id=fields["id"],
        model=fields["model"],
        status=status,
        priority=fields.get("priority", "normal"),
        created_at=iso(fields["created_ms"]) or "",
        started_at=iso(fields.get("started_ms")),
        finished_at=iso(fields.get("finished_ms")),
        expires_at=iso(expires_ms),
        deadline_at=iso(fields.get("deadline_ms")),
        due_ms=int(fields["due_ms"]) if fields.get("due_ms") else None,
        output=json.loads(fields["output"]) if fields.get("output") else None,
        error=JobError(**error) if error else None,
        metrics=JobMetrics(
            queue_ms=_num(fields.get("queue_ms")),
            run_ms=_num(fields.get("run_ms")),
            batch_size=int(batch_size) if batch_size is not None else None,
            worker=fields.get("worker") or None,
            device=fields.get("device") or None,
            device_uuid=fields.get("device_uuid") or None,
            attempts=int(fields.get("attempts") or 0),
        ),
    )
