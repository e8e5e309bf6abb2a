"""A steady load for the chaos tests: submits at a fixed rate from a background thread and keeps
the ids of every job that was answered 202 (the ones the system promised to finish)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx


class SteadyLoad:
    def __init__(self, url: str, model: str, make_input: Any, rate_per_s: float = 20) -> None:
        self.url = url
        self.model = model
        self.make_input = make_input
        self.period_s = 1 / rate_per_s
        self.accepted: list[str] = []
        self.refused: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        with httpx.Client(base_url=self.url, timeout=5) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                try:
                    r = client.post(f"/v1/models/{self.model}/jobs",
                                    json={"input": self.make_input(n)})
                    if r.status_code == 202:
                        self.accepted.append(r.json()["id"])
                    else:
                        self.refused[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    self.refused[type(exc).__name__] += 1
                n += 1
                next_at += self.period_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))
