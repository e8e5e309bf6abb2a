"""The gateway's view of when jobs will run: admission of deadlines and the ETA of queued jobs.

It reads the batcher's published state of each model (at most every `STATE_MAX_AGE_S`, so the
hot path pays a Redis read per model and half second, not per request) and turns it into a
`shared.eta.Drain`. Positions come from the model's due sets (`keys.due`): at submit inside the
SUBMIT script (so admission and position are exact at the moment of the write), on a read with
one pipelined round trip.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis

from shared import keys
from shared.errors import DeadlineUnmeetable
from shared.eta import Drain, Eta, estimate, max_ahead, retry_after_s
from shared.jobs import Job, JobEta, iso, now_ms
from shared.modelspec import ModelSpec
from shared.store import JobStore, NewJob

STATE_MAX_AGE_S = 0.5


def _iso_in(seconds: float) -> str:
    return iso(now_ms() + round(seconds * 1000)) or ""


def eta_of(drain: Drain | None, position: int, rows: int = 1) -> JobEta | None:
    """A queued job's ETA with `position` rows ahead of it (None when nothing is predicted)."""
    if drain is None:
        return None
    est = estimate(drain, position, rows)
    return JobEta(position=position, start_at=_iso_in(est.start_in_s),
                  finish_at=_iso_in(est.finish_in_s))


class Schedule:
    """Deadline admission and ETAs for the gateway's models."""

    def __init__(self, redis: aioredis.Redis, specs: dict[str, ModelSpec]) -> None:
        self.redis = redis
        self.specs = specs
        self._drains: dict[str, tuple[float, Drain | None]] = {}

    async def _state(self, model: str) -> dict[str, Any]:
        raw = await self.redis.get(keys.batcher_state(model))
        return json.loads(raw) if raw else {}

    async def drain_rows_per_s(self, model: str) -> float:
        """The batcher's drain rate as published now (a 429's Retry-After; not cached)."""
        return float((await self._state(model)).get("drain_rows_per_s") or 0.0)

    async def drain(self, model: str) -> Drain | None:
        cached = self._drains.get(model)
        now = time.monotonic()
        if cached is not None and now - cached[0] < STATE_MAX_AGE_S:
            return cached[1]
        drain = Drain.from_state(await self._state(model), self.specs[model].options.max_batch_size)
        self._drains[model] = (now, drain)
        return drain

    async def limits(self, model: str, jobs: list[NewJob]) -> list[int | None] | None:
        """For each job with a deadline, the most rows that may be queued ahead of it (None
        for the others); None when nothing is predicted (no fit, no worker: then every job is
        accepted, since a cold start cannot be predicted)."""
        if all(j.deadline_ms is None for j in jobs):
            return None
        drain = await self.drain(model)
        if drain is None:
            return None
        # A batch's jobs share their deadline and rows: one search per distinct pair.
        found: dict[tuple[int, int], int] = {}
        out: list[int | None] = []
        for j in jobs:
            if j.deadline_ms is None:
                out.append(None)
                continue
            key = (j.deadline_ms, j.rows)
            if key not in found:
                found[key] = max_ahead(drain, j.deadline_ms / 1000, j.rows)
            out.append(found[key])
        return out

    async def refuse(self, model: str, job: NewJob, position: int) -> DeadlineUnmeetable:
        """The 429 for a job whose deadline cannot be met with `position` rows ahead of it."""
        drain = await self.drain(model)
        deadline_s = (job.deadline_ms or 0) / 1000
        eta = estimate(drain, position, job.rows) if drain is not None else Eta(position, 0, 0)
        return DeadlineUnmeetable(
            f"the job would finish in about {1000 * eta.finish_in_s:.0f} ms ({position} rows "
            f"queued ahead of it), past its deadline_ms={job.deadline_ms}",
            retry_after_s=retry_after_s(eta, deadline_s),
            predicted_finish_at=_iso_in(eta.finish_in_s), position=position)

    async def eta(self, model: str, position: int, rows: int = 1) -> JobEta | None:
        return eta_of(await self.drain(model), position, rows)

    async def with_eta(self, store: JobStore, job: Job) -> Job:
        """The job with its ETA when queued (one round trip for its position)."""
        due = job.due_ms
        if job.status != "queued" or due is None:
            return job
        position = max(0, await store.position(job.model, job.priority, due) - 1)
        job.eta = await self.eta(job.model, position)
        return job
