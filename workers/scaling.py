"""The scaling policy: a pure decision core with an injected clock (no I/O).

desired = ceil((queued + in_flight) / concurrency_target), clamped to [min_workers, max_workers]
and to the devices the model can still get. Up at once (workers still starting count as
capacity, so a slow start never triggers a second scale-up); down only after the load stayed
low for `scale_down_delay_s`, one worker per delay window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Action = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class ScaleConfig:
    concurrency_target: int
    min_workers: int = 0
    max_workers: int = 1
    scale_down_delay_s: float = 30.0


@dataclass(frozen=True)
class ScaleInputs:
    queued: int  # jobs waiting (stream entries not yet running)
    in_flight: int  # jobs running
    live: int  # workers serving (ready or busy)
    starting: int  # workers launched that are not serving yet
    free_devices: int  # devices this model could still take


@dataclass(frozen=True)
class ScaleDecision:
    desired: int
    action: Action
    delta: int
    reason: str
    inputs: ScaleInputs

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("inputs"))
        return out


class ScalingPolicy:
    """Per-model scaling state: when the load first went low, when it last scaled down."""

    def __init__(self, config: ScaleConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self._low_since: float | None = None
        self._last_down: float | None = None

    def decide(self, s: ScaleInputs) -> ScaleDecision:
        c = self.config
        now = self.clock()
        current = s.live + s.starting
        load = s.queued + s.in_flight
        wanted = math.ceil(load / c.concurrency_target)
        ceiling = min(c.max_workers, current + s.free_devices)
        desired = max(min(wanted, ceiling), min(c.min_workers, ceiling))
        why = f"load={load} target={c.concurrency_target} wanted={wanted} ceiling={ceiling}"
        if desired > current:
            self._low_since = None
            return ScaleDecision(desired, "up", desired - current, f"scale up: {why}", s)
        if desired == current:
            self._low_since = None
            return ScaleDecision(desired, "hold", 0, f"steady: {why}", s)
        if s.starting:
            # Never shrink while capacity is still arriving: the load figure is about to move.
            return ScaleDecision(current, "hold", 0, f"workers starting: {why}", s)
        if self._low_since is None:
            self._low_since = now
        low_for = now - self._low_since
        since_down = math.inf if self._last_down is None else now - self._last_down
        if low_for >= c.scale_down_delay_s and since_down >= c.scale_down_delay_s:
            self._last_down = now
            self._low_since = now
            return ScaleDecision(current - 1, "down", -1, f"scale down one: {why}", s)
        return ScaleDecision(current, "hold", 0,
                             f"low for {low_for:.1f}s of {c.scale_down_delay_s}s: {why}", s)
