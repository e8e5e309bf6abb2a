"""The worker's heartbeat, driven by the Celery consumer's own event loop.

Why not a side thread: a side loop keeps beating while the consumer that takes batches is hung,
so the batcher would keep counting lanes nobody serves and keep sending batches to a worker that
never starts them. Here the beat is a timer of the consumer's event loop (the kombu hub that also
takes messages off the worker's queue): the worker is alive to the batcher exactly while that
loop turns. Each beat also keeps the stream entries of the batches the worker works on fresh, so
the batcher takes back only entries nobody works on (see `scripts.REFRESH`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps

log = logging.getLogger(__name__)


def install(app: Celery, beat: Callable[[], None], interval_s: float,
            stopped: Callable[[], None]) -> None:
    """Run `beat()` when the consumer starts and every `interval_s` on its event loop;
    `stopped()` when the consumer stops (a lost broker connection restarts it: the worker then
    beats from elsewhere until the consumer is back, so a Redis restart is no death)."""

    class Liveness(bootsteps.StartStopStep):  # type: ignore[misc]
        """Celery consumer bootstep: the beat as a timer of the consumer's loop."""

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.tref: Any = None

        def start(self, c: Any) -> None:
            beat()
            self.tref = c.timer.call_repeatedly(interval_s, beat)
            log.info("liveness started interval_s=%s", interval_s)

        def stop(self, c: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
            stopped()

        shutdown = stop

    app.steps["consumer"].add(Liveness)
