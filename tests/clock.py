"""A clock for the pure decision cores' tests: injected where time.monotonic would be, moved by
hand (`clock.now += 1.0`)."""

from __future__ import annotations


class FakeClock:
    def __init__(self, start_s: float = 100.0) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now
