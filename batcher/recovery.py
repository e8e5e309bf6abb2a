"""What to do with the entries of a worker that died: a pure decision core (no I/O, no clock).

Entries claimed back from a dead worker fall in three kinds, by their job's status:
- `queued`: the worker never started them (a batch still in its queue): they go back to the
  policy like any new request, nobody is charged anything;
- `running`: the worker died while running them: they are suspects;
- anything else (final, or the record is gone): nothing to do but drop the entry.

Suspects run as groups, one group at a time per model (on one lane: the other lanes and workers
keep serving), so that a job that kills its worker takes as few mates down with it as possible:
- a group whose worker died for the first time runs again whole: most deaths are not caused by
  the input (an OOM kill, a node lost, a deploy), and the whole group then finishes in one go;
- a group that died again, or timed out (a hanging item), is split: into single jobs when
  running them one by one is expected to be quicker than bisecting (every bisection round that
  hits the bad item costs a worker restart), else into halves;
- a single job that died alone is run alone again; the worker's START refuses it as poison once
  it has taken its worker down `max_attempts` times alone. Runs inside a group never count, so
  the batch mates of a poison job are never charged with its deaths.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Fate = Literal["requeue", "suspect", "drop"]
Death = Literal["died", "timeout"]
LIVE_STATUSES = ("queued", "running")


def fate_of(status: str | None) -> Fate:
    """What to do with an entry claimed from a dead consumer, by its job's status."""
    if status == "queued":
        return "requeue"
    if status == "running":
        return "suspect"
    return "drop"


@dataclass(frozen=True)
class Group:
    """Suspect entries (opaque keys) dispatched together; `generation` counts the suspect runs
    of theirs that died before this one."""

    group_id: str
    keys: tuple[str, ...]
    generation: int

    @property
    def solo(self) -> bool:
        return len(self.keys) == 1


class Recovery:
    """Suspect groups of one model, in the order they run.

    `batch_cost_s(rows)` estimates a batch's run time (the latency fit plus the fixed overhead);
    `restart_s` what a worker death costs before its replacement serves."""

    def __init__(self, batch_cost_s: Callable[[int], float], restart_s: float = 5.0) -> None:
        self._cost = batch_cost_s
        self._restart_s = restart_s
        self._waiting: deque[Group] = deque()
        self._running: dict[str, Group] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        """Suspect entries not yet finished."""
        return sum(len(g.keys) for g in self._waiting) + sum(
            len(g.keys) for g in self._running.values())

    @property
    def running(self) -> Mapping[str, Group]:
        return self._running

    def keys(self) -> set[str]:
        return {k for g in [*self._waiting, *self._running.values()] for k in g.keys}

    def add(self, keys: Sequence[str], how: Death = "died") -> None:
        """Entries that were running together on a worker when it died (one batch of theirs):
        they run again whole, or already split when the batch timed out."""
        if not keys:
            return
        group = Group(self._new_id(), tuple(keys), 0)
        self._waiting.extend(self._split(group) if how == "timeout" else [group])

    def next_group(self) -> Group | None:
        """The group to dispatch now, if any: groups run one at a time."""
        if self._running or not self._waiting:
            return None
        return self._waiting[0]

    def dispatched(self, group: Group, batch_id: str) -> None:
        self._waiting.remove(group)
        self._running[batch_id] = group

    def undispatched(self, batch_id: str) -> None:
        """The dispatch did not happen (fenced, Redis error): the group waits again."""
        group = self._running.pop(batch_id, None)
        if group is not None:
            self._waiting.appendleft(group)

    def done(self, batch_id: str) -> bool:
        """The group's predict is over without a death; True if it was a suspect batch."""
        return self._running.pop(batch_id, None) is not None

    def discard(self, keys: Iterable[str]) -> None:
        """Entries finished elsewhere (canceled, final): forget them wherever they wait."""
        gone = set(keys)
        if not gone:
            return
        kept: deque[Group] = deque()
        for g in self._waiting:
            left = tuple(k for k in g.keys if k not in gone)
            if left:
                kept.append(Group(g.group_id, left, g.generation))
        self._waiting = kept

    def died(self, batch_id: str) -> Group | None:
        """A suspect batch's worker died (or it timed out) while running it: split it per the
        rules above and queue the parts first. Returns the group it was, None if unknown."""
        group = self._running.pop(batch_id, None)
        if group is None:
            return None
        for part in reversed(self._split(group)):
            self._waiting.appendleft(part)
        return group

    def _split(self, group: Group) -> list[Group]:
        gen = group.generation + 1
        n = len(group.keys)
        if n == 1:
            return [Group(self._new_id(), group.keys, gen)]
        if self.one_by_one(n):
            return [Group(self._new_id(), (k,), gen) for k in group.keys]
        mid = n // 2
        return [Group(self._new_id(), group.keys[:mid], gen),
                Group(self._new_id(), group.keys[mid:], gen)]

    def one_by_one(self, n: int) -> bool:
        """Whether n single runs are expected to end sooner than bisecting n entries: one by
        one costs n short batches and the one death of the bad job; bisection costs a death
        per round, log2(n) rounds, each running half of what is left."""
        singles = n * self._cost(1) + self._restart_s
        rounds = max(1, math.ceil(math.log2(n)))
        bisect = sum(self._restart_s + self._cost(max(1, n >> (r + 1))) for r in range(rounds))
        return singles <= bisect

    def _new_id(self) -> str:
        return f"suspects-{next(self._ids)}"
