"""Keeps the processes of `asyncinfer up` running: a role that exits unasked is restarted with
backoff (`shared.backoff`), logged and counted; one that keeps dying before it is up is given up,
and the stack stops with an error that names it and shows the end of its log.

A role counts as up once it has stayed alive `UP_AFTER_S`: an exit after that is a crash
(restarted after half a second), one before it is a start failure (1, 2, 4, 8 s, then given up).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from asyncinfer.status import last_lines
from shared.backoff import DEFAULT, BackoffConfig, CrashLoop
from shared.procs import terminate

log = logging.getLogger(__name__)

UP_AFTER_S = 10.0
TAIL_LINES = 12


@dataclass
class Role:
    """One supervised process: how to start it, how long it may take to stop, where it logs."""

    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    log_path: Path | None = None
    stop_grace_s: float = 10.0
    proc: subprocess.Popen[bytes] | None = None
    started_s: float = 0.0
    up: bool = False
    loop: CrashLoop = field(default_factory=lambda: CrashLoop(time.monotonic))


class RoleFailed(Exception):
    """A role kept exiting before it was up; the stack cannot serve without it."""

    def __init__(self, role: Role) -> None:
        self.role = role
        loop = role.loop
        super().__init__(
            f"{role.name} keeps exiting on start ({loop.start_failures} times in a row, last "
            f"exit code {loop.last_exit}); giving up")

    def report(self) -> str:
        """The error and the end of the role's log: what a user needs to fix it."""
        lines = [f"asyncinfer: {self}."]
        path = self.role.log_path
        if path is not None and path.exists():
            tail = last_lines(path, TAIL_LINES)
            lines.append(f"  last lines of {path}:")
            lines += [f"    {line}" for line in tail]
        return "\n".join(lines)


class Supervisor:
    def __init__(self, roles: list[Role], backoff: BackoffConfig = DEFAULT,
                 clock: Callable[[], float] = time.monotonic,
                 on_restart: Callable[[Role], None] | None = None) -> None:
        self.roles = {r.name: r for r in roles}
        self.clock = clock
        self.on_restart = on_restart
        for r in roles:
            r.loop = CrashLoop(clock, backoff)

    def start_all(self) -> None:
        for role in self.roles.values():
            self._start(role)

    def _start(self, role: Role) -> None:
        role.proc = role.start()
        role.started_s = self.clock()
        role.up = False

    def poll(self) -> None:
        """Restart what exited (once its backoff allows); raises RoleFailed on a give-up."""
        now = self.clock()
        for role in self.roles.values():
            if role.proc is None:
                if role.loop.may_start():
                    log.info("role restarting role=%s restarts=%d", role.name,
                             role.loop.restarts)
                    self._start(role)
                continue
            code = role.proc.poll()
            if code is None:
                if not role.up and now - role.started_s >= UP_AFTER_S:
                    role.up = True
                    role.loop.up()
                continue
            terminate(role.proc, grace_s=0)  # what is left of its process group
            role.proc = None
            delay = role.loop.exited(code, was_up=role.up)
            if self.on_restart is not None:
                self.on_restart(role)
            if role.loop.gave_up:
                log.error("role given up role=%s code=%s start_failures=%d", role.name, code,
                          role.loop.start_failures)
                raise RoleFailed(role)
            log.warning("role exited role=%s code=%s up=%s restart_in_s=%.1f restarts=%d",
                        role.name, code, role.up, delay, role.loop.restarts)

    def stop(self, order: list[str]) -> None:
        """Stop the roles in `order` (then any other), each within its grace."""
        names = [n for n in order if n in self.roles] + [n for n in self.roles if n not in order]
        for name in names:
            role = self.roles[name]
            if role.proc is not None:
                terminate(role.proc, grace_s=role.stop_grace_s)
                role.proc = None
