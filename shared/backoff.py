"""Restart backoff for a process that keeps dying: a pure core with an injected clock (no I/O).

Used by `asyncinfer up` for its roles and by the local launcher for each model's workers.

- An exit after the process was up (ready) restarts it after `base_s`: one crash costs little.
- An exit before it was ever up is a start failure. Consecutive start failures wait
  `base_s * factor**n` (capped at `max_s`), and after `give_up_after` of them in a row the
  process is given up: it keeps failing the same way, and restarting it forever only hides that.
- Becoming up again clears the streak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

State = Literal["ok", "backoff", "failed"]


@dataclass(frozen=True)
class BackoffConfig:
    base_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    give_up_after: int = 5  # consecutive start failures


DEFAULT = BackoffConfig()


class CrashLoop:
    """The restart state of one supervised thing (a role, or one model's workers)."""

    def __init__(self, clock: Callable[[], float],
                 config: BackoffConfig = DEFAULT) -> None:
        self.clock = clock
        self.config = config
        self.start_failures = 0  # consecutive exits before being up
        self.restarts = 0  # every unrequested exit
        self.last_exit: int | None = None
        self.gave_up = False
        self._retry_at = -float("inf")

    def exited(self, code: int | None, was_up: bool) -> float:
        """Record an unrequested exit; returns the delay before the next start (inf once
        given up)."""
        c = self.config
        self.restarts += 1
        self.last_exit = code
        self.start_failures = 0 if was_up else self.start_failures + 1
        if self.start_failures >= c.give_up_after:
            self.gave_up = True
            self._retry_at = float("inf")
            return float("inf")
        delay = min(c.max_s, c.base_s * c.factor ** self.start_failures)
        self._retry_at = self.clock() + delay
        return delay

    def up(self) -> None:
        """The process became ready: a later exit is a crash, not a start failure."""
        self.start_failures = 0

    def may_start(self) -> bool:
        return not self.gave_up and self.clock() >= self._retry_at

    def retry_in_s(self) -> float:
        return max(0.0, self._retry_at - self.clock())

    @property
    def state(self) -> State:
        if self.gave_up:
            return "failed"
        return "backoff" if self.clock() < self._retry_at else "ok"
