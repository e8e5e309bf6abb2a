"""`GET /v1/jobs/{id}/events`: a job's status changes as Server-Sent Events.

One event per status the job goes through, in order: `queued` (id 1), `running` (id 2), then
the final one (id 3: `succeeded`, `failed`, `canceled` or `expired`), each with the job JSON as
its data; the stream closes after the final event. A client that reconnects with
`Last-Event-ID: n` gets only the events after n. A status the job went through before the client
connected is sent too (with the job as it is now, under that status), so every client sees the
whole sequence. The job is marked watched, so its start is published (`keys.RUNNING_CHANNEL`);
its end comes with the final channel every long-poll uses. Comments keep idle connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from gateway.waiters import CompletionWaiters
from shared.jobs import FINAL_STATUSES, Job
from shared.store import JobStore

KEEPALIVE_S = 15.0
MEDIA_TYPE = "text/event-stream"


def sequence_of(status: str) -> int:
    """The event id of a status: 1 queued, 2 running, 3 final."""
    return 3 if status in FINAL_STATUSES else 2 if status == "running" else 1


def _event(job: Job, status: str) -> bytes:
    body = job.public()
    body["status"] = status
    if status != job.status:  # a step it went through before: no result or ETA yet
        body.pop("output", None)
        body.pop("error", None)
        body["eta"] = None
    data = json.dumps(body, separators=(",", ":"))
    return f"id: {sequence_of(status)}\nevent: {status}\ndata: {data}\n\n".encode()


def _steps(job: Job, after: int) -> list[str]:
    """The statuses to send for `job` now, past event id `after`."""
    passed = ["queued"]
    if job.started_at is not None or job.status == "running":
        passed.append("running")
    if job.status in FINAL_STATUSES:
        passed.append(job.status)
    return [s for s in passed if sequence_of(s) > after]


def parse_last_event_id(raw: str | None) -> int:
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0


async def job_events(job_id: str, first: Job, waiters: CompletionWaiters,
                     queue: asyncio.Queue[str], read: Callable[[], Awaitable[Job]],
                     after: int, with_eta: Callable[[Job], Awaitable[Job]]
                     ) -> AsyncIterator[bytes]:
    """The event stream of a job already checked and watched (`first`); `queue` was
    registered with `waiters.listen` before the check, so no change can slip between them."""
    try:
        job, sent = first, after
        while True:
            for status in _steps(job, sent):
                if status == "queued" and job.status == "queued":
                    job = await with_eta(job)
                yield _event(job, status)
                sent = sequence_of(status)
            if sent >= 3:
                return
            try:
                await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            with contextlib.suppress(asyncio.QueueEmpty):
                while True:  # one read covers every notice queued meanwhile
                    queue.get_nowait()
            job = await read()
    finally:
        waiters.unlisten(job_id, queue)


async def open_events(store: JobStore, waiters: CompletionWaiters, job_id: str, owner: str,
                      after: int, with_eta: Callable[[Job], Awaitable[Job]]
                      ) -> AsyncIterator[bytes]:
    """Check and watch the job (NotFound for a job that is gone or not the caller's: raised
    here, before any byte is sent), then its event stream."""
    queue = waiters.listen(job_id)
    try:
        first = await store.watch(job_id, owner)
    except BaseException:
        waiters.unlisten(job_id, queue)
        raise
    return job_events(job_id, first, waiters, queue, lambda: store.get(job_id, owner), after,
                      with_eta)
