"""The stream entries a worker holds, kept fresh on every heartbeat.

From the moment a batch's task starts until its final write, the worker refreshes the idle time
of the batch's entries (only those still pending on its own consumer; never taking one back).
The batcher takes back entries of a live worker only once they have gone unrefreshed for twice
the liveness lapse: a batch the worker gave up on (a Redis error before its final write), never a
healthy one, however long its predict runs.
"""

from __future__ import annotations

import logging
import threading

import redis.asyncio as aioredis

from shared import keys, scripts

log = logging.getLogger(__name__)


class HeldEntries:
    """Batches running in this worker and their entries ("priority/entry id" refs)."""

    def __init__(self, redis: aioredis.Redis, model: str, consumer: str) -> None:
        self.redis = redis
        self.model = model
        self.consumer = consumer
        self._streams = keys.streams(model)
        self._index: dict[str, int] = {p: i + 1 for i, p in enumerate(keys.PRIORITIES)}
        self._refresh = redis.register_script(scripts.REFRESH)
        self._lock = threading.Lock()  # Celery pool threads add, the I/O loop reads
        self._batches: dict[str, list[str]] = {}
        self._predicting: set[str] = set()

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch_id: str, refs: list[str]) -> None:
        with self._lock:
            self._batches[batch_id] = list(refs)
            self._predicting.add(batch_id)

    def lane_freed(self, batch_id: str) -> None:
        with self._lock:
            self._predicting.discard(batch_id)

    def remove(self, batch_id: str) -> None:
        with self._lock:
            self._batches.pop(batch_id, None)
            self._predicting.discard(batch_id)

    def before_lane_free(self) -> list[str]:
        """Batches whose predict is not over yet (a new batcher counts them as busy lanes)."""
        with self._lock:
            return sorted(self._predicting)

    async def refresh(self) -> None:
        """Reset the idle time of every held entry still owned by this worker."""
        with self._lock:
            refs = [r for refs in self._batches.values() for r in refs]
        if not refs:
            return
        args: list[str | int] = [keys.BATCHER_GROUP, self.consumer]
        for ref in refs:
            priority, _, entry_id = ref.partition("/")
            args += [self._index.get(priority, 2), entry_id]
        lost = await self._refresh(keys=self._streams, args=args)
        if lost:
            # Taken back while we held it: this worker was presumed dead. Its START refuses
            # batches it no longer owns; one already running finishes, first write wins.
            log.warning("entries no longer held worker_consumer=%s count=%d", self.consumer,
                        len(lost))
