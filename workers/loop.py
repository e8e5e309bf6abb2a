"""An asyncio event loop on a background thread, so Celery's pool threads can use the async
job store (one implementation of every Redis call, shared with the gateway and batcher)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from shared.eventloop import new_loop

T = TypeVar("T")


class LoopThread:
    """Owns a private event loop running forever on a daemon thread."""

    def __init__(self, name: str = "asyncinfer-loop") -> None:
        self.loop = new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the loop and block the calling thread for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Start `coro` on the loop without waiting; cancel() on the result stops it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
