"""The job store: every read and write of job records, as one-round-trip async calls."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from shared import keys, scripts
from shared.errors import Conflict, Fenced, NotFound, QueueFull
from shared.jobs import FINAL_STATUSES, Job, Priority, from_hash, new_job_id, now_ms
from shared.muxredis import MuxRedis

PRIORITY_INDEX: dict[str, int] = {"high": 1, "normal": 2, "low": 3}


@dataclass(frozen=True)
class NewJob:
    """What a submit carries for one job. `input_json` is the validated input, encoded once."""

    input_json: str
    priority: Priority = "normal"
    ttl_s: float | None = None
    rows: int = 1
    webhook: str | None = None
    deadline_ms: int | None = None  # relative to the submit, as the client gave it
    webhook_events: tuple[str, ...] = ("final",)


@dataclass(frozen=True)
class Outcome:
    """The final state a worker writes for one job."""

    job_id: str
    status: str
    output_json: str | None = None
    error: dict[str, str] | None = None
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class Submitted:
    ids: list[str]
    created_ms: int
    replay: bool = False  # an Idempotency-Key replay: the ids are of the earlier jobs
    positions: list[int] | None = None  # rows queued ahead of each job right after its submit
    # (index of the job, its position) when a job's deadline cannot be met: nothing was written
    unmeetable: tuple[int, int] | None = None


@dataclass(frozen=True)
class Started:
    """What `JobStore.start` found for one job."""

    job_id: str
    verdict: str
    attempts: int = 0
    input_json: str | None = None
    created_ms: int = 0


def body_hash(raw: bytes | str) -> str:
    data = raw.encode() if isinstance(raw, str) else raw
    return hashlib.sha256(data).hexdigest()


class JobStore:
    """Job records in Redis. Safe to share between tasks of one event loop."""

    def __init__(self, redis: aioredis.Redis, *, result_ttl_s: int, job_ttl_s: int,
                 idempotency_ttl_s: int = 86_400, max_attempts: int = 3,
                 mux: MuxRedis | None = None) -> None:
        self.redis = redis
        # The gateway's per-request calls (submit, get) go through the pipelined client when
        # one is given; batch-level calls keep redis-py's pipelines.
        self.mux = mux
        self.result_ttl_ms = result_ttl_s * 1000
        self.job_ttl_s = job_ttl_s
        # A key never outlives the records it names, so a replay always finds them: a record
        # lives at least result_ttl_s (CANCELED_TTL_S once canceled) after its submit.
        self.idempotency_ttl_ms = min(idempotency_ttl_s, result_ttl_s, keys.CANCELED_TTL_S) * 1000
        self.max_attempts = max_attempts
        self._submit = redis.register_script(scripts.SUBMIT)
        self._start = redis.register_script(scripts.START)
        self._finish = redis.register_script(scripts.FINISH)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._watch = redis.register_script(scripts.WATCH)

    async def submit(self, model: str, jobs: Sequence[NewJob], *, owner: str = "",
                     max_queue: int, max_queue_per_key: int = 0,
                     idempotency_key: str | None = None, request_hash: str = "",
                     ids: Sequence[str] | None = None, max_latency_ms: float = 0,
                     created_ms: int | None = None,
                     max_ahead: Sequence[int | None] | None = None,
                     traceparent: str = "") -> Submitted:
        """Write the records and append the stream entries atomically; returns the job ids.

        Raises QueueFull when the backlog would pass `max_queue`, or the owner's queued jobs of
        this model `max_queue_per_key` (0: no per-key limit); Conflict when the idempotency key
        was used with another body. The key is scoped to (owner, model) and stored as its
        digest; a replay of the same key and body returns the first ids. `ids`, when given, are
        the new jobs' ids (a caller that watches for them beforehand). A job's due time (its
        order within its priority) is its deadline, else `created + max_latency_ms`.
        `max_ahead[i]`: the most rows that may be queued ahead of job i (it has a deadline); past
        it nothing is written and `unmeetable` says which job and its position.
        `traceparent` (W3C), when given, goes into each stream entry for the batcher's and
        workers' spans.
        """
        created = created_ms if created_ms is not None else now_ms()
        streams = keys.streams(model)
        idem = keys.idempotency(owner, model, body_hash(idempotency_key)) \
            if idempotency_key else ""
        owned = keys.owner_queue(model, owner) if max_queue_per_key > 0 else ""
        ids = list(ids) if ids is not None else [new_job_id() for _ in jobs]
        argv: list[Any] = [0, self.result_ttl_ms, self.idempotency_ttl_ms, request_hash, model,
                           created, len(jobs), max_queue_per_key, keys.JOB_PREFIX,
                           keys.OWNER_PRUNE_MIN]
        limits = list(max_ahead) if max_ahead is not None else [None] * len(jobs)
        for job_id, job, limit in zip(ids, jobs, limits, strict=True):
            ttl_ms = int((job.ttl_s if job.ttl_s is not None else self.job_ttl_s) * 1000)
            deadline = "" if job.deadline_ms is None else created + job.deadline_ms
            due = created + (job.deadline_ms if job.deadline_ms is not None else max_latency_ms)
            argv += [job_id, PRIORITY_INDEX[job.priority], created + ttl_ms, job.rows,
                     job.priority, job.input_json, owner, job.webhook or "", int(due), deadline,
                     ",".join(job.webhook_events), "" if limit is None else limit]
        argv[0] = max_queue
        argv.append(keys.DUE_SLACK_MS)
        argv.append(traceparent)  # always last (the script reads ARGV[#ARGV])
        job_keys = [*streams, idem, owned, *keys.dues(model), *map(keys.job, ids)]
        if self.mux is not None:
            reply = await self.mux.evalsha(self._submit.sha, scripts.SUBMIT, job_keys, argv)
        else:
            reply = await self._submit(keys=job_keys, args=argv)
        kind = _s(reply[0])
        if kind == "idem":
            if _s(reply[2]) != request_hash:
                raise Conflict("Idempotency-Key was already used with a different request body")
            return Submitted(_s(reply[1]).split(","), created, replay=True)
        if kind == "full":
            depth, scope = int(_s(reply[1])), _s(reply[2])
            if scope == "api_key":
                raise QueueFull(f"this API key has {depth} jobs queued for model {model!r}, its "
                                f"limit is {max_queue_per_key}", retry_after_s=1,
                                queue_depth=depth, limit=max_queue_per_key, scope=scope)
            raise QueueFull(f"model {model!r} has {depth} jobs queued", retry_after_s=1,
                            queue_depth=depth, limit=max_queue, scope=scope)
        if kind == "unmeetable":
            return Submitted([], created, unmeetable=(int(reply[1]), int(reply[2])))
        positions = [int(p) for p in _s(reply[2]).split(",")] if len(reply) > 2 else None
        return Submitted(ids, created, positions=positions)

    async def get(self, job_id: str, owner: str = "") -> Job:
        """The job, or NotFound (also for a job of another API key)."""
        if self.mux is not None:
            return self.visible(job_id, await self.mux.hgetall(keys.job(job_id)), owner)
        fields = await self.redis.hgetall(keys.job(job_id))
        return self.visible(job_id, _decode(fields), owner)

    async def get_many(self, job_ids: Sequence[str], owner: str = "") -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        rows = await pipe.execute()
        return [self.visible(i, _decode(r), owner) for i, r in zip(job_ids, rows, strict=True)]

    async def watch(self, job_id: str, owner: str = "") -> Job:
        """Mark the job followed (its start is then published) and return it; NotFound for a
        job that is gone or of another owner."""
        flat = await self._watch(keys=[keys.job(job_id)], args=[owner])
        fields = {_s(k): _s(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
        return self.visible(job_id, fields, owner)

    async def position(self, model: str, priority: Priority, due_ms: int) -> int:
        """Queued jobs of the model ahead of one due at `due_ms` in `priority`: every queued job
        of a higher priority and those of its own due no later (itself included)."""
        pipe = self.redis.pipeline(transaction=False)
        level = keys.PRIORITIES.index(priority)
        for higher in keys.PRIORITIES[:level]:
            pipe.zcard(keys.due(model, higher))
        pipe.zcount(keys.due(model, priority), "-inf", due_ms)
        return sum(int(n) for n in await pipe.execute())

    async def statuses(self, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's status, None for a record that is gone; one round trip."""
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        return [None if s is None else _s(s) for s in await pipe.execute()]

    @staticmethod
    def visible(job_id: str, fields: dict[str, str], owner: str) -> Job:
        """The job from its record fields, or NotFound when absent or of another owner."""
        if not fields or "status" not in fields or fields.get("owner", "") != owner:
            raise NotFound(f"no job {job_id!r}")
        return from_hash(fields)

    async def cancel(self, job_id: str, owner: str = "") -> Job:
        """Cancel a queued or running job; Conflict when it is already final."""
        reply = await self._cancel(
            keys=[keys.job(job_id), keys.webhooks()],
            args=[owner, now_ms(), keys.CANCELED_TTL_S * 1000, keys.FINAL_CHANNEL,
                  keys.BATCHER_GROUP, keys.STATS_PREFIX, keys.CANCEL_CHANNEL_PREFIX,
                  keys.WEBHOOKS_MAXLEN],
        )
        kind = _s(reply[0])
        if kind == "missing":
            raise NotFound(f"no job {job_id!r}")
        if kind == "final":
            raise Conflict(f"job {job_id!r} is already {_s(reply[1])}")
        return await self.get(job_id, owner)

    async def start(self, job_ids: Sequence[str], worker: str, device: str, *, consumer: str,
                    solo: bool = False, attempt_cap: int = 0,
                    batch_id: str = "") -> list[Started]:
        """Mark a batch's jobs running, one script call. The verdict is 'run', 'poison' (run
        alone and took its worker down `max_attempts` times, or past `attempt_cap` runs in
        all), 'moved' (its entry is no longer this worker's `consumer`'s: the batch was taken
        back), or the status that makes the job skip ('canceled', 'expired', 'missing', ...).
        Called again with the same `batch_id` by the same consumer (the first reply was lost),
        jobs it already started answer 'run' with their attempts unchanged."""
        if not job_ids:
            return []
        job_keys, args = self.start_call(job_ids, worker, device, consumer=consumer, solo=solo,
                                         attempt_cap=attempt_cap, batch_id=batch_id)
        return started(job_ids, await self._start(keys=job_keys, args=args))

    def start_call(self, job_ids: Sequence[str], worker: str, device: str, *, consumer: str,
                   solo: bool, attempt_cap: int, batch_id: str) -> tuple[list[str], list[Any]]:
        """The START script's keys and arguments (for this client or a blocking one)."""
        cap = attempt_cap or 1_000_000
        return [keys.job(j) for j in job_ids], [
            now_ms(), worker, device, keys.BATCHER_GROUP, consumer, "1" if solo else "0",
            self.max_attempts, cap, keys.RUNNING_CHANNEL, keys.webhooks(), keys.WEBHOOKS_MAXLEN,
            batch_id]

    async def finish(self, outcomes: Sequence[Outcome], *,
                     report: tuple[str, Mapping[str, str]] | None = None,
                     fence: tuple[str, str] | None = None) -> list[bool]:
        """Write final states (first writer wins) and ack their stream entries, one script
        call; with `report` (a stream and its fields), XADD it in the same round trip, first.
        With `fence` (lease key, token), write nothing unless the lease still holds the token
        (raises Fenced). Returns, per job, whether this call's state is the one that stuck."""
        if not outcomes:
            return []
        job_keys, args = self.finish_call(outcomes, fence)
        if report is None:
            return finished(await self._finish(keys=job_keys, args=args))
        pipe = self.redis.pipeline(transaction=False)
        queue_report_and_finish(pipe, report, self._finish.sha, job_keys, args)
        replies = reported_finish(*await pipe.execute(raise_on_error=False))
        if replies is None:  # a restarted Redis: load the script, once
            replies = await self._finish(keys=job_keys, args=args)
        return finished(replies)

    def finish_call(self, outcomes: Sequence[Outcome],
                    fence: tuple[str, str] | None = None) -> tuple[list[str], list[Any]]:
        """The FINISH script's keys and arguments (for this client or a blocking one)."""
        args: list[Any] = [self.result_ttl_ms, keys.FINAL_CHANNEL, keys.BATCHER_GROUP,
                           keys.STATS_PREFIX, keys.WEBHOOKS_MAXLEN, keys.PUBLISH_RECORD_MAX_BYTES,
                           *(fence or ("", ""))]
        stamp = now_ms()
        for o in outcomes:
            assert o.status in FINAL_STATUSES, o.status
            fields: list[Any] = ["finished_ms", stamp]
            if o.output_json is not None:
                fields += ["output", o.output_json]
            if o.error is not None:
                fields += ["error", json.dumps(o.error)]
            for name, value in (o.metrics or {}).items():
                if value is not None:
                    fields += [name, value]
            args += [o.status, len(fields) // 2, *fields]
        return [keys.webhooks(), *(keys.job(o.job_id) for o in outcomes)], args

    async def dead_letter(self, model: str, job_id: str, attempts: int, reason: str) -> None:
        await self.redis.xadd(keys.dead_letters(model),
                              {"job": job_id, "attempts": attempts, "reason": reason},
                              maxlen=keys.DEAD_LETTER_MAXLEN, approximate=True)

    async def backlog(self, model: str) -> tuple[int, int]:
        """(queued, in_flight) jobs of the model: in flight are the entries the batcher handed to
        workers (pending on a worker's consumer); the rest of the stream waits."""
        pipe = self.redis.pipeline(transaction=False)
        streams = keys.streams(model)
        for stream in streams:
            pipe.xlen(stream)
        for stream in streams:
            pipe.xpending(stream, keys.BATCHER_GROUP)
        replies = await pipe.execute(raise_on_error=False)
        total = sum(int(r) for r in replies[:3] if isinstance(r, int))
        in_flight = 0
        for summary in replies[3:]:
            if isinstance(summary, dict):  # an error reply: the group does not exist yet
                for c in summary.get("consumers") or []:
                    if keys.worker_of_consumer(_s(c.get("name", ""))) is not None:
                        in_flight += int(c.get("pending", 0))
        return max(0, total - in_flight), in_flight


def started(job_ids: Sequence[str], replies: Sequence[Any]) -> list[Started]:
    """What START found for each job, from its reply."""
    out: list[Started] = []
    for job_id, reply in zip(job_ids, replies, strict=True):
        kind = _s(reply[0])
        if kind == "run":
            out.append(Started(job_id, "run", int(reply[1]), _s(reply[2]), int(reply[3])))
        elif kind == "poison":
            out.append(Started(job_id, "poison", int(reply[1])))
        else:
            out.append(Started(job_id, _s(reply[1]) if len(reply) > 1 else kind))
    return out


def queue_report_and_finish(pipe: Any, report: tuple[str, Mapping[str, str]], sha: str,
                            job_keys: list[str], args: list[Any]) -> None:
    """Queue the lane report's XADD, then FINISH, on a pipeline of either client. The script
    goes as a plain EVALSHA: a Script object in a pipeline makes redis-py send SCRIPT EXISTS
    first, a second round trip on every lone job's path."""
    pipe.xadd(report[0], dict(report[1]), maxlen=keys.COMPLETIONS_MAXLEN, approximate=True)
    pipe.evalsha(sha, len(job_keys), *job_keys, *args)


def reported_finish(added: Any, replies: Any) -> Any:
    """FINISH's reply from that pipeline's two; raises the report's error; None when Redis no
    longer has the script (restarted), which the caller then loads by running it."""
    if isinstance(added, Exception):
        raise added
    return None if isinstance(replies, NoScriptError) else replies


def finished(replies: Any) -> list[bool]:
    """Per job, whether the FINISH call's state stuck; raises the script's error, and Fenced
    for a fenced write."""
    if isinstance(replies, Exception):
        raise replies
    if isinstance(replies, bytes | str):
        raise Fenced(_s(replies))
    return [int(r) == 1 for r in replies]


def _s(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in fields.items()}
