"""`asyncinfer up` as users run it (the console script, embedded Redis, default settings):
kill -9 of each role under steady load, a role that cannot start, and Ctrl-C leaving nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from asyncinfer import stack as stack_module
from asyncinfer.loadgen import SteadyLoad
from asyncinfer.stack import Stack
from asyncinfer.supervisor import Role
from shared.procs import free_port
from shared.redisconn import connect_sync
from shared.settings import Settings
from tests.conftest import wait_until
from tests.procfs import children

pytestmark = pytest.mark.slow
SCRIPT = Path(sys.executable).parent / "asyncinfer"
ROLE_MARKS = {"gateway": b"gateway", "batcher": b"batcher", "autoscaler": b"workers.autoscaler",
              "flower": b"flower", "redis": b"redis-server"}


def _children(parent: int) -> dict[str, int]:
    """The roles `asyncinfer up` (pid `parent`) runs now, by name."""
    out = {}
    for pid, cmd in children(parent).items():
        for role, mark in ROLE_MARKS.items():
            # redis-server rewrites its title into one string: "redis-server 127.0.0.1:PORT".
            if any(part == mark or (part.startswith(b"/") and mark in part) for part in cmd):
                out[role] = pid
    return out


def _stack_pids(state_dir: Path) -> set[int]:
    """Every process that belongs to the stack in `state_dir` (workers included)."""
    found = set()
    needle = str(state_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCINFER_")}
    return {**env, "ASYNCINFER_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", **extra}


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _serves(url: str) -> bool:
    """A fresh job runs end to end (gateway, batcher, a worker, Redis)."""
    try:
        r = httpx.post(f"{url}/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                       headers={"Prefer": "wait=5"}, timeout=10)
        return r.status_code == 200 and r.json()["status"] == "succeeded"
    except httpx.HTTPError:
        return False


# With the default reclaim_idle_s (60 s), a batch whose final write met the dead Redis runs
# again only once its entries have been idle that long.
SETTLE_S = 180.0


def _final(url: str, job_id: str, deadline_s: float) -> str:
    status = "unknown"
    with httpx.Client(base_url=url, timeout=40) as client:
        while time.monotonic() < deadline_s:
            status = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"]
            if status in ("succeeded", "failed", "canceled", "expired"):
                break
    return status


def test_up_restarts_killed_roles_under_load_and_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port, flower_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    out = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([str(SCRIPT), "up", "--state-dir", str(state)], stdout=out,
                          stderr=subprocess.STDOUT, start_new_session=True,
                          env=_env(ASYNCINFER_GATEWAY_PORT=str(port),
                                   ASYNCINFER_FLOWER_PORT=str(flower_port),
                                   # the load's sleep_s is a fault hook of the synthetic model
                                   ASYNCINFER_FAULT_INJECTION="true"))
    load: SteadyLoad | None = None
    recovery: dict[str, tuple[float, float]] = {}
    try:
        wait_until(lambda: _serves(url), 120, "the stack serving a first job")
        load = SteadyLoad(url, "synthetic", lambda n: {"x": n, "sleep_s": 0.02}, 20).start()
        time.sleep(2)
        for role in ("batcher", "gateway", "flower", "redis"):
            victim = _children(up.pid)[role]
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            def replaced(r: str = role, v: int = victim) -> bool:
                return _children(up.pid).get(r, v) != v

            wait_until(replaced, 30, f"{role} restarted")
            if role == "flower":
                wait_until(lambda: _port_open(flower_port), 30, "flower answering")
            wait_until(lambda: _ready(url), 30, "the gateway ready")
            ready_s = time.monotonic() - t0
            wait_until(lambda: _serves(url), 60, f"serving again after {role}")
            recovery[role] = (ready_s, time.monotonic() - t0)
            time.sleep(2)  # steady load between faults
        load.stop()
        accepted = load.accepted
        assert len(accepted) > 100
        t_settle = time.monotonic()
        statuses = [_final(url, j, deadline_s=t_settle + SETTLE_S) for j in accepted]
        settle_s = time.monotonic() - t_settle
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        if load is not None:
            load.stop()
        up.send_signal(signal.SIGINT)
        code = up.wait(120)
        out.close()
    log = (tmp_path / "up.log").read_text()
    print(f"up chaos: accepted={len(accepted)} refused={dict(load.refused)} settled in "
          f"{settle_s:.1f}s, recovery "
          + ", ".join(f"{r}: ready {a:.1f}s serving {b:.1f}s" for r, (a, b) in recovery.items()))
    assert statuses == ["succeeded"] * len(accepted), [s for s in statuses if s != "succeeded"]
    for role, (ready_s, serving_s) in recovery.items():
        assert ready_s <= 10, (role, recovery)
        # A new batcher waits out the dead one's lease (lease_ttl_s, 5 s) before dispatching.
        assert serving_s <= 15, (role, recovery)
    for role in recovery:
        assert f'asyncinfer_role_restarts_total{{role="{role}"}} 1.0' in metrics, role
    assert code == 0, log
    assert "asyncinfer stopped." in log
    wait_until(lambda: not _stack_pids(state), 10, "no process of the stack left")


@pytest.mark.parametrize("env, policy", [({}, "always"),
                                         ({"ASYNCINFER_REDIS_APPENDFSYNC": "everysec"},
                                          "everysec")])
def test_the_embedded_redis_runs_with_the_fsync_policy_asked_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
        policy: str) -> None:
    """By default the Redis `up` starts answers a write only once it is on disk (what the
    chaos test above rests on); ASYNCINFER_REDIS_APPENDFSYNC trades that for latency. The
    roles' supervisor is replaced by one that starts only Redis."""
    started: list[Role] = []

    class RedisOnly:
        def __init__(self, roles: list[Role], **_: object) -> None:
            self.roles = roles

        def start_all(self) -> None:
            [redis_role] = [r for r in self.roles if r.name == "redis"]
            redis_role.start()
            started.append(redis_role)

    monkeypatch.setattr(stack_module, "Supervisor", RedisOnly)
    monkeypatch.delenv("ASYNCINFER_REDIS_URL", raising=False)
    monkeypatch.delenv("ASYNCINFER_REDIS_APPENDFSYNC", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stack = Stack(Settings(), tmp_path / "state", with_flower=False)
    stack.start()
    assert started and stack.redis_server is not None
    try:
        client = connect_sync(stack.settings)
        try:
            assert client.config_get("appendfsync") == {"appendfsync": policy}
        finally:
            client.close()
    finally:
        stack.redis_server.stop()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_role_that_cannot_start_stops_the_stack_with_its_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    # An address of no interface here (TEST-NET-3): the gateway cannot bind and exits at once.
    run = subprocess.run([str(SCRIPT), "up", "--no-flower", "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=180,
                         env=_env(ASYNCINFER_GATEWAY_HOST="203.0.113.7",
                                  ASYNCINFER_GATEWAY_PORT=str(free_port())))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "asyncinfer: gateway keeps exiting on start (5 times in a row" in run.stderr
    assert "gateway.log" in run.stderr and "error while attempting to bind" in run.stderr
    assert "asyncinfer is up" not in run.stdout
    assert not _stack_pids(state)
