"""Celery's `threads` pool, plus a wake-up of the worker's event loop when a task is done.

Why: with prefetch disabled, the consumer asks Redis for the next message only when a pool slot
is free, and it checks that on an iteration of its event loop (kombu's hub). A task finishing in a
pool thread does not wake that loop (celery/celery#6941), so the next batch waited for the next
timer tick or network event: measured here, about 2 s per batch with task events off, and a few
milliseconds with them on (their flush happened to wake it). Waking the hub once the task's
completion is recorded lets the consumer take the next batch at once.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from celery.concurrency.thread import TaskPool
from kombu.asynchronous import get_event_loop


def _noop() -> None:
    """Scheduled on the hub only to make its loop run one more iteration."""


class WakingThreadPool(TaskPool):  # type: ignore[misc]
    """Select with `-P workers.pool:WakingThreadPool`."""

    def on_apply(self, *args: Any, **kwargs: Any) -> Any:
        result = super().on_apply(*args, **kwargs)
        hub = get_event_loop()
        if hub is not None:
            # Runs after apply_target returned, i.e. after Celery's own completion callback
            # released the request (the state can_consume() reads).
            future: Future[Any] = result.f
            future.add_done_callback(lambda _: hub.call_soon(_noop))  # type: ignore[no-untyped-call]
        return result
