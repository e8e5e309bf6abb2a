"""One gateway of several processes sharing its port (`gateway_processes`), through real
processes: every process serves jobs, /metrics answers the same totals whichever process a scrape
reaches, a killed process is replaced while the others serve, and a killed server takes its
processes along (so a restart finds the port free)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.__main__ import METRICS_DIR_ENV, server_processes
from tests.conftest import Procs, wait_until
from tests.gateway.test_metrics import _value, needs_promtool, promtool_problems

pytestmark = pytest.mark.slow
JOBS = 60


def test_the_default_is_one_process_per_four_cores_and_at_most_four() -> None:
    assert [server_processes(0, cores) for cores in (1, 2, 4, 7, 8, 12, 16, 64)] == [
        1, 1, 1, 1, 2, 3, 4, 4]
    assert server_processes(3, 2) == 3  # asked for: as many as asked


def _servers(parent: int) -> list[int]:
    """The server processes under a gateway (uvicorn's; not multiprocessing's tracker)."""
    try:
        kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return []
    out = []
    for pid in map(int, kids):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:  # a zombie (state Z) has exited; its parent, or init, has yet to reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def _job(url: str, i: int) -> str:
    # A connection per call, as many clients would: the kernel hands each to one process.
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/models/synthetic/jobs", json={"input": {"x": float(i)}})
        assert r.status_code == 202, r.text
        done = c.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 20}, timeout=30).json()
        return str(done["status"])


def _start(procs: Procs) -> tuple[str, subprocess.Popen[bytes], list[int]]:
    url = procs.serving("synthetic", ASYNCINFER_GATEWAY_PROCESSES="2")
    gateway = procs.all[-1]
    wait_until(lambda: len(_servers(gateway.pid)) == 2, 30, "two gateway processes")
    return url, gateway, _servers(gateway.pid)


def test_every_process_serves_and_metrics_count_each_job_once(procs: Procs) -> None:
    url, _, servers = _start(procs)
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda i: _job(url, i), range(JOBS))) == ["succeeded"] * JOBS
    # Each process that took a submit left its counts in the server's shared folder.
    shared = Path(_environ(servers[0])[METRICS_DIR_ENV])
    assert {p.name for p in shared.glob("counter_*.db")} == {f"counter_{p}.db" for p in servers}
    for _ in range(8):  # scrapes land on either process: the same totals each time
        with httpx.Client(base_url=url, timeout=10) as c:
            text = c.get("/metrics").text
        assert _value(text, 'asyncinfer_jobs_submitted_total{model="synthetic"}') == JOBS
        assert _value(text, 'asyncinfer_submit_duration_seconds_count{model="synthetic"}') == JOBS
        assert _value(text, "asyncinfer_gateway_system_exporter") == 1  # one server, one id
        assert _value(text, 'asyncinfer_jobs_finished_total{model="synthetic",'
                            'status="succeeded"}') == JOBS
    assert text.count("# TYPE asyncinfer_jobs_submitted_total ") <= 1


@needs_promtool
def test_the_shared_metrics_pass_promtool(procs: Procs) -> None:
    url, _, _ = _start(procs)
    assert _job(url, 1) == "succeeded"
    with httpx.Client(base_url=url, timeout=10) as c:
        assert promtool_problems(c.get("/metrics").text) == ""


def test_a_killed_process_is_replaced_and_a_killed_server_takes_the_rest_along(
        procs: Procs) -> None:
    url, gateway, servers = _start(procs)
    os.kill(servers[0], signal.SIGKILL)
    # The other process goes on serving meanwhile (a client of the killed one sees its
    # connection drop; a new connection reaches a live process).
    assert [_job(url, i) for i in range(5)] == ["succeeded"] * 5
    wait_until(lambda: len(_servers(gateway.pid)) == 2 and servers[0] not in
               _servers(gateway.pid), 30, "a replacement gateway process")
    assert _job(url, 99) == "succeeded"
    rest = _servers(gateway.pid)
    shared = Path(_environ(rest[0])[METRICS_DIR_ENV])
    gateway.kill()  # kill -9 of the server: the supervisor (asyncinfer up) would start another
    gateway.wait(10)
    deadline = time.monotonic() + 15
    while any(map(_alive, rest)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, rest)), "orphaned gateway processes"
    assert shared.exists()  # kill -9: nobody removed it
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:  # free for the next server
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    # The next server sweeps away the folder of the killed one.
    procs.gateway(ASYNCINFER_GATEWAY_PROCESSES="2")
    assert not shared.exists()
