"""What `asyncinfer up` shows of the processes it runs: a status table of the roles, and a tail
of the problems (warnings, errors, tracebacks) their logs report while it runs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b")
MAX_PER_LOOK = 10  # problem lines shown per look; the rest are counted


@dataclass(frozen=True)
class RoleRow:
    role: str
    pid: int | None
    state: str
    detail: str


def role_rows(procs: Mapping[str, subprocess.Popen[bytes] | None], details: Mapping[str, str],
              restarts: Mapping[str, int] | None = None,
              starting: Collection[str] = ()) -> list[RoleRow]:
    """One row per role: its process id, its state (`starting` until its supervisor counts it
    up, `running`, `exited (code)`, `restarting` between two lives), how often it was
    restarted, and where to look."""
    rows = []
    for role, proc in procs.items():
        n = (restarts or {}).get(role, 0)
        if proc is None:
            state = "restarting" if n else "not started"
        else:
            code = proc.poll()
            state = ("starting" if role in starting else "running") if code is None \
                else f"exited ({code})"
        if n:
            state += f", {n} restart{'s' if n > 1 else ''}"
        rows.append(RoleRow(role, None if proc is None else proc.pid, state,
                            details.get(role, "")))
    return rows


def table(rows: list[RoleRow]) -> str:
    header = RoleRow("ROLE", None, "STATE", "WHERE")
    width_role = max(len(r.role) for r in [header, *rows])
    width_state = max(len(r.state) for r in [header, *rows])
    lines = []
    for r in [header, *rows]:
        pid = "PID" if r is header else str(r.pid or "-")
        lines.append(f"  {r.role:<{width_role}}  {pid:>7}  {r.state:<{width_state}}  {r.detail}"
                     .rstrip())
    return "\n".join(lines)


class ProblemTail:
    """Problem lines written to the logs of a folder since the last look (like `tail -f |
    grep`), for every log there, those of workers started later included. Lines already in a
    log when this starts (earlier runs) are not shown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.offsets = {p: p.stat().st_size for p in log_dir.glob("*.log")} \
            if log_dir.is_dir() else {}

    def look(self) -> list[str]:
        found: list[str] = []
        for path in sorted(self.log_dir.glob("*.log")) if self.log_dir.is_dir() else []:
            start = self.offsets.get(path, 0)
            size = path.stat().st_size
            if size < start:  # truncated: read it anew
                start = 0
            if size == start:
                continue
            with path.open("rb") as f:
                f.seek(start)
                chunk = f.read(size - start)
            # Only whole lines: a line being written is read at the next look.
            complete = chunk.rfind(b"\n") + 1
            self.offsets[path] = start + complete
            for raw in chunk[:complete].decode("utf-8", "replace").splitlines():
                if PROBLEM.search(raw):
                    found.append(f"{path.stem}: {raw.strip()}")
        if len(found) > MAX_PER_LOOK:
            more = len(found) - MAX_PER_LOOK
            found = [*found[:MAX_PER_LOOK], f"... and {more} more problem lines in {self.log_dir}"]
        return found


def last_lines(path: Path, n: int = 15) -> list[str]:
    """The end of one log (for a role that exited)."""
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        return f.read().decode("utf-8", "replace").splitlines()[-n:]
