"""The batcher's Redis stream I/O for one model: read, hand over to workers, reclaim.

Ownership of an entry in the consumer group tells where its job is:
- pending on a batcher consumer: read and held in that batcher's memory, not yet dispatched;
- pending on the INFLIGHT consumer: dispatched to a worker (claimed there at dispatch, which also
  resets its idle time, so idle time measures time since dispatch);
- gone: its job reached a final state (the worker acks and deletes it).
So a new leader takes every entry held by another batcher at once, and entries in flight only
when they have been idle longer than any healthy batch could run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from batcher.policy import Priority
from shared import keys

log = logging.getLogger(__name__)

INFLIGHT = keys.INFLIGHT_CONSUMER
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


def _entry(stream: str, priority: Priority, entry_id: str, fields: dict[str, str]) -> Entry | None:
    if not fields or "job" not in fields:  # deleted after delivery (job finished or canceled)
        return None
    exp = fields.get("exp")
    return Entry(entry_id, stream, priority, fields["job"], int(fields.get("rows", 1)),
                 int(entry_id.split("-", 1)[0]), int(exp) if exp else None)


class ModelStreams:
    """Stream operations of one model for one batcher consumer."""

    def __init__(self, redis: aioredis.Redis, model: str, consumer: str) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self.streams = {keys.stream(model, p): p for p in PRIORITY_ORDER}

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
                e = _entry(stream, self.streams[stream], entry_id, fields)
                if e is not None:
                    out.append(e)
        return out

    async def read_own_pending(self) -> list[Entry]:
        """Entries this consumer read before (a restarted loop under the same name)."""
        reply = await self.redis.xreadgroup(
            keys.BATCHER_GROUP, self.consumer, dict.fromkeys(self.streams, "0"), count=10_000)
        return [e for stream, entries in stream_items(reply) for entry_id, fields in entries
                if (e := _entry(stream, self.streams[stream], entry_id, fields)) is not None]

    async def hand_over(self, entries: list[Entry]) -> None:
        """Move dispatched entries to the in-flight consumer (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        by_stream: dict[str, list[Any]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.entry_id)
        for stream, ids in by_stream.items():
            pipe.xclaim(stream, keys.BATCHER_GROUP, INFLIGHT, 0, ids, justid=True)
        await pipe.execute()

    async def drop(self, entries: list[Entry]) -> None:
        """Ack and delete entries whose jobs were finished by the batcher (shed, expired)."""
        pipe = self.redis.pipeline(transaction=False)
        for e in entries:
            pipe.xack(e.stream, keys.BATCHER_GROUP, e.entry_id)
            pipe.xdel(e.stream, e.entry_id)
        await pipe.execute()

    async def take_over_held(self, live_consumers: set[str]) -> list[Entry]:
        """Claim entries held (read, not dispatched) by batcher consumers that are gone."""
        out: list[Entry] = []
        for stream, priority in self.streams.items():
            for info in await self.redis.xinfo_consumers(stream, keys.BATCHER_GROUP):
                name = info["name"]
                if name in live_consumers or name in (INFLIGHT, self.consumer):
                    continue
                if int(info.get("pending", 0)):
                    pending = await self.redis.xpending_range(
                        stream, keys.BATCHER_GROUP, "-", "+", 10_000, consumername=name)
                    ids: list[Any] = [p["message_id"] for p in pending]
                    claimed: Any = await self.redis.xclaim(
                        stream, keys.BATCHER_GROUP, self.consumer, 0, ids)
                    out += [e for i, f in claimed
                            if (e := _entry(stream, priority, i, f)) is not None]
                await self.redis.xgroup_delconsumer(stream, keys.BATCHER_GROUP, name)
                log.info("took over entries model=%s from=%s count=%d", self.model, name,
                         len(out))
        return out

    async def reclaim_stale(self, min_idle_ms: int) -> list[Entry]:
        """Claim entries idle past `min_idle_ms`: their worker or batcher died mid-flight."""
        out: list[Entry] = []
        for stream, priority in self.streams.items():
            cursor = "0-0"
            while True:
                reply = await self.redis.xautoclaim(stream, keys.BATCHER_GROUP, self.consumer,
                                                    min_idle_ms, cursor, count=100)
                cursor, claimed = reply[0], reply[1]
                out += [e for i, f in claimed if (e := _entry(stream, priority, i, f)) is not None]
                if cursor in ("0-0", b"0-0"):
                    break
        return out


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
