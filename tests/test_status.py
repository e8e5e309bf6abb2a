"""`asyncinfer up`'s status table and the tail of problems from its processes' logs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from asyncinfer.status import ProblemTail, last_lines, role_rows, table


def test_table_lists_each_role_its_pid_state_and_where() -> None:
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    try:
        rows = role_rows({"redis": None, "gateway": alive, "batcher": dead},
                         {"gateway": "http://127.0.0.1:8000"})
        text = table(rows).splitlines()
    finally:
        alive.kill()
        alive.wait()
    assert text[0].split() == ["ROLE", "PID", "STATE", "WHERE"]
    assert text[1].split() == ["redis", "-", "not", "started"]
    assert text[2].split() == ["gateway", str(alive.pid), "running", "http://127.0.0.1:8000"]
    assert text[3].split() == ["batcher", str(dead.pid), "exited", "(3)"]
    # Columns line up.
    assert len({line.index(line.split()[2]) for line in text[1:3]}) == 1


def test_problem_tail_shows_new_problems_of_every_log_once(tmp_path: Path) -> None:
    old = tmp_path / "gateway.log"
    old.write_text("2026 ERROR gateway from an earlier run\n")
    tail = ProblemTail(tmp_path)
    assert tail.look() == []
    with old.open("a") as f:
        f.write("2026 INFO gateway started\n2026 WARNING gateway slow redis\n2026 ERROR half")
    (tmp_path / "worker-mlp-1.log").write_text("Traceback (most recent call last):\n  x\n")
    assert tail.look() == ["gateway: 2026 WARNING gateway slow redis",
                           "worker-mlp-1: Traceback (most recent call last):"]
    with old.open("a") as f:
        f.write(" a line\n")
    assert tail.look() == ["gateway: 2026 ERROR half a line"]
    assert tail.look() == []
    with old.open("a") as f:
        f.writelines(f"ERROR {i}\n" for i in range(25))
    shown = tail.look()
    assert len(shown) == 11 and shown[-1].startswith("... and 15 more")
    assert last_lines(old, 2) == ["ERROR 23", "ERROR 24"]
