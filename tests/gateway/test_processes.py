"""One gateway of several processes sharing its port (`gateway_processes`, gateway.servers),
through real processes: jobs and /metrics through the port as through one gateway, the exporter
lease held by the server rather than by one process, a killed process replaced while the others
serve, a killed server taking its processes along and its metrics folder swept by the next, and
a server that cannot start saying so with its exit status instead of restarting forever."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from gateway.servers import METRICS_DIR_ENV, SERVER_ID_ENV, server_processes
from shared import keys
from shared.procs import free_port
from shared.settings import Settings
from tests.conftest import Procs, env_of, wait_until
from tests.gateway.test_metrics import _value, needs_promtool, promtool_problems
from tests.procfs import alive, children

pytestmark = pytest.mark.slow
JOBS = 60
STARTUP_FAILURE = 3  # uvicorn's exit status for a server that could not start


def test_the_default_is_one_process_per_four_cores_and_at_most_four() -> None:
    assert [server_processes(0, cores) for cores in (1, 2, 4, 7, 8, 12, 16, 64)] == [
        1, 1, 1, 1, 2, 3, 4, 4]
    assert server_processes(3, 2) == 3  # asked for: as many as asked


def _servers(parent: int) -> list[int]:
    """The live server processes under a gateway (uvicorn's; not multiprocessing's tracker)."""
    return sorted(pid for pid, cmd in children(parent).items()
                  if b"--multiprocessing-fork" in cmd)


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


def _scrape(url: str) -> str:
    with httpx.Client(base_url=url, timeout=10) as c:
        return c.get("/metrics").text


def _start(procs: Procs) -> tuple[str, subprocess.Popen[bytes], list[int]]:
    url = procs.serving("synthetic", ASYNCINFER_GATEWAY_PROCESSES="2")
    gateway = procs.all[-1]
    wait_until(lambda: len(_servers(gateway.pid)) == 2, 30, "two gateway processes")
    return url, gateway, _servers(gateway.pid)


def _lease(settings: Settings) -> str | None:
    with redis.Redis.from_url(settings.redis_url, decode_responses=True) as r:
        holder = r.get(keys.metrics_exporter())
        return None if holder is None else str(holder)


def test_jobs_and_metrics_through_the_port_count_each_job_once(procs: Procs) -> None:
    url, _, _ = _start(procs)
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda i: _job(url, i), range(JOBS))) == ["succeeded"] * JOBS
    for _ in range(8):  # scrapes land on either process: the same totals each time
        text = _scrape(url)
        assert _value(text, 'asyncinfer_jobs_submitted_total{model="synthetic"}') == JOBS
        assert _value(text, 'asyncinfer_submit_duration_seconds_count{model="synthetic"}') == JOBS
        assert _value(text, "asyncinfer_gateway_system_exporter") == 1  # one server, one id
        assert _value(text, 'asyncinfer_jobs_finished_total{model="synthetic",'
                            'status="succeeded"}') == JOBS
        assert text.count("# TYPE asyncinfer_jobs_submitted_total ") == 1


@needs_promtool
def test_the_shared_metrics_pass_promtool(procs: Procs) -> None:
    url, _, _ = _start(procs)
    assert _job(url, 1) == "succeeded"
    assert promtool_problems(_scrape(url)) == ""


def test_the_exporter_lease_is_the_servers_not_one_processes(procs: Procs,
                                                            settings: Settings) -> None:
    url, gateway, servers = _start(procs)
    _scrape(url)
    server_id = _environ(servers[0])[SERVER_ID_ENV]
    assert _lease(settings) == server_id
    os.kill(servers[0], signal.SIGTERM)  # one process stops cleanly; its siblings go on
    wait_until(lambda: len(_servers(gateway.pid)) == 2 and servers[0] not in
               _servers(gateway.pid), 30, "a replacement gateway process")
    assert _lease(settings) == server_id
    gateway.terminate()  # the server stops: it gives the lease up for another to take at once
    assert gateway.wait(30) == 0
    assert _lease(settings) is None


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
    # Each gets SIGTERM from the kernel and stops as on a normal stop (no request is open here).
    deadline = time.monotonic() + 15
    while any(map(alive, rest)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, rest)), "orphaned gateway processes"
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:  # free for the next server
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert shared.exists()  # kill -9: nobody removed it
    # The next server sweeps away the dead one's folder, and only that.
    procs.gateway(ASYNCINFER_GATEWAY_PROCESSES="2")
    live = procs.all[-1]
    wait_until(lambda: len(_servers(live.pid)) == 2, 30, "the next server's processes")
    assert not shared.exists()
    assert Path(_environ(_servers(live.pid)[0])[METRICS_DIR_ENV]).exists()


@pytest.mark.parametrize("processes", ["1", "2"])
@pytest.mark.parametrize("bad", ["models", "redis_url"])
def test_a_gateway_that_cannot_start_exits_with_an_error(settings: Settings, tmp_path: Path,
                                                         processes: str, bad: str) -> None:
    # A models file that cannot be read fails before any process starts; a Redis URL the
    # client refuses fails in each process's start-up. Either way the server stops with an
    # error status (uvicorn restarts a process that merely died, so one that would fail the
    # same way again must not look like that, nor like a clean stop).
    env = {**os.environ, **env_of(settings), "ASYNCINFER_GATEWAY_PROCESSES": processes,
           "ASYNCINFER_GATEWAY_PORT": str(free_port())}
    if bad == "models":
        env["ASYNCINFER_MODELS"] = str(tmp_path / "absent.toml")
    else:
        env["ASYNCINFER_REDIS_URL"] = "http://127.0.0.1:1/0"
    done = subprocess.run([sys.executable, "-m", "gateway"], env=env, capture_output=True,
                          timeout=60)
    expected = {1, STARTUP_FAILURE} if bad == "models" else {STARTUP_FAILURE}
    assert done.returncode in expected, done.stderr.decode()[-2000:]
    assert done.stderr.count(b"Traceback") <= 2, "restarted what would fail again"
