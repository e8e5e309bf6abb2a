"""Processes as /proc shows them, for tests that kill and count real processes (Linux)."""

from __future__ import annotations

from pathlib import Path


def _stat(pid: int | str) -> list[str]:
    # The fields after the command name, which may itself hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (state Z) has exited, its parent has yet to reap it."""
    try:
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def children(parent: int) -> dict[int, list[bytes]]:
    """The live children of `parent`: pid -> its command line, split at NULs."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = _stat(entry.name)
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z":
            out[int(entry.name)] = cmd
    return out
