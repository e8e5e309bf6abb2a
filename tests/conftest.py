"""Fixtures that run the real parts: a private redis-server per test module, the gateway app,
and batcher/worker/gateway processes started and reaped by the `procs` fixture."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.app import create_app
from shared.procs import free_port, spawn, terminate, wait_port
from shared.redisserver import RedisServer
from shared.settings import Settings

MODELS = Path(__file__).parent / "models.toml"
HAS_TORCH = importlib.util.find_spec("torch") is not None
# Without torch (CI's second Python: torch's CPU build is installed for one Python only) the GPU
# module cannot even be imported; tests marked `torch` are skipped with the reason.
collect_ignore = [] if HAS_TORCH else ["workers/test_gpu.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_TORCH:
        return
    skip = pytest.mark.skip(reason="needs torch, not installed in this environment "
                                   "(ASYNCINFER_TORCH=none)")
    for item in items:
        if "torch" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def test_settings(redis_server: RedisServer) -> Settings:
    # Every timer (heartbeat, liveness lapse, lease) at the default users get.
    # fault_injection: the tests drive failures through the synthetic model's fault hooks.
    return Settings(redis_url=redis_server.url, models=MODELS, devices="cpu:2",
                    max_body_bytes=64 * 1024, fault_injection=True)


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    redis.Redis.from_url(redis_server.url).flushall()
    return test_settings(redis_server)


def env_of(settings: Settings) -> dict[str, str]:
    """The settings as the environment a child process reads them from."""
    env = {"ASYNCINFER_REDIS_URL": settings.redis_url, "ASYNCINFER_MODELS": str(MODELS),
           "ASYNCINFER_DEVICES": settings.devices,
           "ASYNCINFER_RECLAIM_IDLE_S": str(settings.reclaim_idle_s),
           "ASYNCINFER_LEASE_TTL_S": str(settings.lease_ttl_s),
           "ASYNCINFER_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
           "ASYNCINFER_HEARTBEAT_LAPSE_S": str(settings.heartbeat_lapse_s),
           "ASYNCINFER_MAX_ATTEMPTS": str(settings.max_attempts),
           "ASYNCINFER_MAX_BODY_BYTES": str(settings.max_body_bytes),
           "ASYNCINFER_FAULT_INJECTION": str(settings.fault_injection).lower(),
           "ASYNCINFER_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    if settings.redis_tls_ca_file:
        env["ASYNCINFER_REDIS_TLS_CA_FILE"] = settings.redis_tls_ca_file
    return env


class Procs:
    """Starts the system's processes for one test and kills whatever is left at the end."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        proc = spawn(["-m", *args], {**env_of(self.settings), **env},
                     self.log_dir / f"{name}.log")
        self.all.append(proc)
        return proc

    def batcher(self, **env: str) -> subprocess.Popen[bytes]:
        return self.start(f"batcher-{len(self.all)}", "batcher", **env)

    def worker(self, model: str, index: int = 1, /, **env: str) -> subprocess.Popen[bytes]:
        return self.start(f"worker-{model}-{index}", "workers", "--model", model,
                          "--index", str(index), WORKER_INDEX=str(index), **env)

    def serving(self, model: str = "synthetic", /, **env: str) -> str:
        """A batcher, one worker of `model` and a gateway, all with `env`; returns the gateway's
        URL once the worker serves."""
        self.batcher(**env)
        self.worker(model, 1, **env)
        url = self.gateway(**env)
        wait_until(workers_ready(self.settings, model, 1), 60, f"a {model} worker")
        return url

    def gateway(self, **env: str) -> str:
        """A gateway process (uvicorn) on a free port, settings overridden by `env`."""
        port = free_port()
        self.start(f"gateway-{port}", "gateway", ASYNCINFER_GATEWAY_PORT=str(port), **env)
        assert wait_port("127.0.0.1", port, 30), self.logs()
        return f"http://127.0.0.1:{port}"

    def autoscaler(self, name: str = "autoscaler", **env: str) -> subprocess.Popen[bytes]:
        """`python -m workers.autoscaler`, its workers' logs next to the test's other logs."""
        return self.start(name, "workers.autoscaler", ASYNCINFER_LOG_DIR=str(self.log_dir),
                          **env)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.all:
            terminate(proc, grace_s=5)


@pytest.fixture
def procs(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    p = Procs(settings, tmp_path / "logs")
    yield p
    p.stop_all()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(p.logs())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    rep = yield
    if rep.when == "call":  # type: ignore[attr-defined]
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


@pytest.fixture(scope="module")
def procs_module(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Procs]:
    """Processes that live for a whole module (the test settings)."""
    p = Procs(test_settings(redis_server), tmp_path_factory.mktemp("logs"))
    yield p
    p.stop_all()


@pytest.fixture(scope="module")
def uvicorn_gateway(procs_module: Procs) -> str:
    """A real gateway process (uvicorn) with the test settings, for a whole module."""
    return procs_module.gateway()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in process (lifespan included) over the ASGI transport."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for a condition of the system under test (not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def workers_ready(settings: Settings, model: str, n: int) -> Callable[[], bool]:
    import json

    from shared import keys

    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    def check() -> bool:
        beats = [json.loads(v) for v in r.hgetall(keys.workers(model)).values()]
        return sum(1 for b in beats if b["state"] in ("ready", "busy")) >= n

    return check


os.environ.setdefault("ASYNCINFER_LOG_LEVEL", "WARNING")
