"""The batcher's reads of a model's request streams, and the entries it finishes itself.

Where an entry is pending in the consumer group tells where its job is:
- on a batcher consumer: read, held in that batcher's memory, not yet dispatched;
- on a worker's consumer (`keys.worker_consumer`): dispatched to that worker (see
  `batcher.dispatch`, which moves it there and pushes the worker's task in one step);
- gone: its job reached a final state (the worker, a cancel or the batcher acked and deleted it).
Entry ids repeat across a model's priority streams (two XADDs in one millisecond), so an entry is
known by its stream and id together (`Entry.key`) everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from batcher.policy import Priority
from shared import keys, tracing

log = logging.getLogger(__name__)

PRIORITY_ORDER: tuple[Priority, ...] = keys.PRIORITIES


@dataclass(frozen=True)
class Entry:
    """One stream entry as read: enough to batch it without touching the job record."""

    entry_id: str
    stream: str
    priority: Priority
    job_id: str
    rows: int
    submitted_ms: int
    expires_ms: int | None
    deadline_ms: int | None = None  # the job's deadline (epoch ms), when it has one
    trace: str = ""  # the submit's traceparent when the job is traced (shared.tracing)

    @property
    def key(self) -> str:
        """Unique across the model's streams."""
        return entry_key(self.stream, self.entry_id)


def entry_key(stream: str, entry_id: str) -> str:
    return f"{stream}/{entry_id}"


def make_entry(stream: str, priority: Priority, entry_id: str,
               fields: dict[str, str] | None) -> Entry | None:
    """The entry from its stream fields; None for an entry deleted after delivery."""
    if not fields or "job" not in fields:  # deleted after delivery (job finished or canceled)
        return None
    exp, dl = fields.get("exp"), fields.get("dl")
    return Entry(entry_id, stream, priority, fields["job"], int(fields.get("rows", 1)),
                 int(entry_id.split("-", 1)[0]), int(exp) if exp else None,
                 int(dl) if dl else None, fields.get(tracing.ENTRY_FIELD, ""))


class ModelStreams:
    """Stream operations of one model for one batcher consumer."""

    def __init__(self, redis: aioredis.Redis, model: str, consumer: str) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.streams = {keys.stream(model, p): p for p in PRIORITY_ORDER}
        self.names = list(self.streams)

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, keys.BATCHER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """New entries, high priority streams first; blocks up to `block_ms` when there are none."""
        reply = await self.redis.xreadgroup(
            keys.BATCHER_GROUP, self.consumer, dict.fromkeys(self.streams, ">"),
            count=count, block=block_ms)
        out: list[Entry] = []
        for stream, entries in stream_items(reply):
            for entry_id, fields in entries:
                e = make_entry(stream, self.streams[stream], entry_id, fields)
                if e is not None:
                    out.append(e)
        return out

    async def read_own_pending(self) -> list[Entry]:
        """Entries this consumer read before (a restarted loop under the same name)."""
        reply = await self.redis.xreadgroup(
            keys.BATCHER_GROUP, self.consumer, dict.fromkeys(self.streams, "0"), count=10_000)
        return [e for stream, entries in stream_items(reply) for entry_id, fields in entries
                if (e := make_entry(stream, self.streams[stream], entry_id, fields)) is not None]

    async def own_idle(self, min_idle_ms: int, known: Collection[str] = (),
                       count: int = 1000) -> list[Entry]:
        """Entries pending on this consumer, idle at least `min_idle_ms`, but for those whose
        key is `known` (their idle time restarts: they are claimed to this consumer again).
        Read-ahead entries wait here for long under a backlog: they are left alone."""
        out: list[Entry] = []
        for stream, priority in self.streams.items():
            pending = await self.redis.xpending_range(
                stream, keys.BATCHER_GROUP, "-", "+", count, consumername=self.consumer,
                idle=min_idle_ms)
            ids: list[Any] = [p["message_id"] for p in pending
                              if entry_key(stream, str(p["message_id"])) not in known]
            if ids:
                claimed: Any = await self.redis.xclaim(stream, keys.BATCHER_GROUP,
                                                       self.consumer, 0, ids)
                out += [e for i, f in claimed
                        if (e := make_entry(stream, priority, str(i), f)) is not None]
        return out

    async def drop(self, entries: list[Entry]) -> None:
        """Ack and delete entries whose jobs were finished by the batcher (shed, expired)."""
        pipe = self.redis.pipeline(transaction=False)
        for e in entries:
            pipe.xack(e.stream, keys.BATCHER_GROUP, e.entry_id)
            pipe.xdel(e.stream, e.entry_id)
        await pipe.execute()


def stream_items(reply: object) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """XREADGROUP replies come as a list of [stream, entries] or (RESP3) a dict."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(s, e[0] if e and isinstance(e[0], list) else e) for s, e in reply.items()]
    return [(s, e) for s, e in reply]  # type: ignore[attr-defined]


def mono_from_epoch_ms(epoch_ms: float, mono_now: float, wall_now: float) -> float:
    """Map a wall-clock epoch time onto the monotonic clock (for budgets that start at submit).
    Callers read both clocks once per batch of entries, so equal submit times stay equal."""
    return mono_now - (wall_now - epoch_ms / 1000)
