"""A steady background load (for chaos and protocol tests): submits at a fixed rate from a
thread of its own until stopped, and keeps the id of every job answered 202, the ones the
system promised to finish.

    load = SteadyLoad(url, "synthetic", lambda n: {"x": n}, rate_per_s=25).start()
    ...
    load.stop()
    load.accepted, load.refused, load.unanswered
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from asyncinfer.loadgen.drive import Config, Recorder, open_loop
from asyncinfer.loadgen.http import HTTPError, RawClient
from asyncinfer.loadgen.protocols import Outcome, submit_protocol

DRAIN_S = 10.0  # at stop, how long submits already sent may take to be answered


class SteadyLoad:
    """`refused` counts every submit not answered 202: by HTTP status (`"429"`, `"503"`), or
    `unreachable` (no connection), `unanswered` (sent, no answer: it may have been queued) and
    `timeout`."""

    def __init__(self, url: str, model: str, make_input: Callable[[int], Any],
                 rate_per_s: float = 20, timeout_s: float = 5.0) -> None:
        self.cfg = Config(url=url, path=f"/v1/models/{model}/jobs", protocol="submit",
                          mode="open", arrivals="fixed", rate=rate_per_s, duration_s=math.inf,
                          timeout_s=timeout_s, max_inflight=256, label=f"steady {model}")
        self.make_input = make_input
        self.accepted: list[str] = []
        self.refused: Counter[str] = Counter()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    @property
    def unanswered(self) -> int:
        """Submits that may have been queued though no answer came back."""
        return self.refused["unanswered"] + self.refused["timeout"]

    def start(self) -> SteadyLoad:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        """Stop and wait for the drain; again after a stop it does nothing."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is over already
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DRAIN_S + 20)

    def _body(self, n: int) -> bytes:
        return json.dumps({"input": self.make_input(n)}).encode()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        cfg = self.cfg
        client = RawClient(cfg.url, cfg.max_inflight, cfg.timeout_s)
        submit = submit_protocol(client, cfg.path, keep_id=True)

        async def one(body: bytes) -> Outcome:
            try:
                out = await submit(body)
            except HTTPError as exc:
                self.refused["timeout" if str(exc) == "timeout" else
                             "unanswered" if exc.sent else "unreachable"] += 1
                raise
            except (ValueError, KeyError):
                self.refused["bad_answer"] += 1
                raise
            if out.job_id is not None:
                self.accepted.append(out.job_id)
            else:
                self.refused[out.status.removeprefix("http_")] += 1
            return out

        tasks: set[asyncio.Task[Any]] = set()
        try:
            await open_loop(cfg, one, self._body, Recorder(t0=time.perf_counter()), tasks,
                            stop=self._stop)
            if tasks:
                await asyncio.wait(set(tasks), timeout=DRAIN_S)
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.close()
