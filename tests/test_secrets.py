"""No default secrets: `asyncinfer up` generates the webhook secret and the Flower password on
first start, keeps them in its state directory (owner-only), shows them once, and never puts one
on a command line."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from asyncinfer.secrets import SECRETS_FILE, ensure_secrets
from shared.procs import free_port, terminate, wait_port
from shared.settings import Settings


def test_generated_once_then_reused_and_the_environment_wins(tmp_path: Path) -> None:
    first = ensure_secrets(tmp_path, Settings())
    assert set(first.created) == {"ASYNCINFER_WEBHOOK_SECRET", "ASYNCINFER_FLOWER_PASSWORD"}
    assert first.values["ASYNCINFER_WEBHOOK_SECRET"].startswith("whsec_")
    assert stat.S_IMODE((tmp_path / SECRETS_FILE).stat().st_mode) == 0o600
    again = ensure_secrets(tmp_path, Settings())
    assert again.created == {} and again.values == first.values
    mine = ensure_secrets(tmp_path, Settings(flower_password="chosen"))
    assert mine.values["ASYNCINFER_FLOWER_PASSWORD"] == "chosen" and mine.created == {}
    assert first.values["ASYNCINFER_FLOWER_PASSWORD"] in (tmp_path / SECRETS_FILE).read_text()


def _up(state: Path, gateway_port: int, flower_port: int) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCINFER_")}
    env |= {"ASYNCINFER_GATEWAY_PORT": str(gateway_port),
            "ASYNCINFER_FLOWER_PORT": str(flower_port), "ASYNCINFER_DEVICES": "cpu:1"}
    proc = subprocess.Popen([sys.executable, "-m", "asyncinfer.cli", "up", "--state-dir",
                             str(state)], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return proc, "".join(lines)
    terminate(proc)  # type: ignore[arg-type]
    raise AssertionError("asyncinfer up did not come up:\n" + "".join(lines))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        terminate(proc)  # type: ignore[arg-type]


@pytest.mark.slow
def test_asyncinfer_up_makes_its_secrets_and_shows_them_once(tmp_path: Path) -> None:
    gateway_port, flower_port = free_port(), free_port()
    proc, out = _up(tmp_path, gateway_port, flower_port)
    try:
        stored = (tmp_path / SECRETS_FILE).read_text()
        values = dict(line.split("=", 1) for line in stored.splitlines() if "=" in line
                      and not line.startswith("#"))
        password = values["ASYNCINFER_FLOWER_PASSWORD"]
        assert f"ASYNCINFER_FLOWER_PASSWORD={password}" in out and str(tmp_path) in out
        assert values["ASYNCINFER_WEBHOOK_SECRET"].startswith("whsec_")
        assert wait_port("127.0.0.1", flower_port, 60)
        api = f"http://127.0.0.1:{flower_port}/api/workers"
        assert httpx.get(api, auth=("admin", "asyncinfer"), timeout=10).status_code == 401
        deadline = time.monotonic() + 30
        while httpx.get(api, auth=("admin", password), timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert password.encode() not in cmdline, cmdline
        # Webhooks are on (a secret exists) and refuse what the address policy refuses.
        r = httpx.post(f"http://127.0.0.1:{gateway_port}/v1/models/synthetic/jobs",
                       json={"input": {"x": 1}, "webhook": "http://169.254.169.254/latest"})
        assert r.status_code == 422 and "link-local" in r.json()["error"]["message"]
    finally:
        _stop(proc)
    proc, out = _up(tmp_path, gateway_port, flower_port)
    _stop(proc)
    assert "New secrets" not in out and password not in out
    assert (tmp_path / SECRETS_FILE).read_text() == stored
