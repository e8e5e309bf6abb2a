"""Child processes that never outlive their parent: own session (so a whole tree can be
signalled), PR_SET_PDEATHSIG on Linux (so a SIGKILLed parent still takes them down), and a
terminate that escalates from SIGTERM to SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux; elsewhere a
    no-op). Mind the race: a parent that died before this call is not noticed by it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the session and terminate() still apply
        pass


def spawn(args: list[str], env: Mapping[str, str] | None = None,
          log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `args` (a `python -m ...` when args[0] is '-m') in its own session; its output
    goes to `log_path`, else to this process's own (a container's log, say)."""
    if args and args[0] == "-m":
        args = [sys.executable, *args]
    out: IO[bytes] | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - the child keeps it open
    return subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> int | None:
    """SIGTERM the process group, wait up to `grace_s`, then SIGKILL it."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    _signal_group(proc, signal.SIGKILL)  # stragglers of the group, even if the leader exited
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_port(host: str, port: int, timeout_s: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
