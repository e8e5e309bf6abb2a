"""Which device a new worker gets: a pure decision over this host's devices and the workers
already on them, across every model (no I/O).

- The least loaded device wins (ties: the device list's order), so no two workers share a
  device while another one is free, whatever model they serve.
- A model puts at most `per_device` of its own workers on one device (its
  `workers_per_device`, 1 by default): with the default, a model never doubles up on a device,
  and once every device holds a worker, a further model shares the least loaded one.
- A worker that stops frees its device for any model at the next allocation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.devices import Device


@dataclass(frozen=True)
class Placement:
    model: str
    device: Device


def room(devices: list[Device], placed: Iterable[Placement], model: str,
         per_device: int) -> int:
    """How many more workers `model` may start on these devices."""
    mine = [p.device for p in placed if p.model == model]
    return sum(max(0, per_device - mine.count(d)) for d in devices)


def pick(devices: list[Device], placed: Iterable[Placement], model: str,
         per_device: int) -> Device | None:
    """The device for a new worker of `model`, or None when it has no room left."""
    placed = list(placed)
    load = {d: 0 for d in devices}
    mine = dict(load)
    for p in placed:
        if p.device in load:
            load[p.device] += 1
            if p.model == model:
                mine[p.device] += 1
    candidates = [d for d in devices if mine[d] < per_device]
    if not candidates:
        return None
    # Ties go to the first in device order (min keeps the first of equal keys).
    return min(candidates, key=lambda d: (load[d], mine[d]))
