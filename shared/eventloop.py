"""The event loop every asyncio process runs: uvloop where it is installed (it comes with
`uvicorn[standard]`, a dependency), else asyncio's own. Each hop of a job (a stream read, a
dispatch, a worker's Redis calls) is a few loop iterations; uvloop's are cheaper."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

try:
    import uvloop

    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - a platform without uvloop wheels (Windows)
    HAVE_UVLOOP = False


def new_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop (for a thread of its own)."""
    return uvloop.new_event_loop() if HAVE_UVLOOP else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on the chosen loop."""
    if HAVE_UVLOOP:
        return uvloop.run(main)
    return asyncio.run(main)
