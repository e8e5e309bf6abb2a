"""Several HTTP server processes on one gateway port (`gateway_processes`).

One Python process answers about one core's worth of HTTP requests; on a GPU host with many
cores that, not the GPU, caps the jobs per second. Several processes behind one port lift it
without a proxy. uvicorn's supervisor starts them, restarts one that dies, and stops them with
itself; each also dies with its server when that is killed (PR_SET_PDEATHSIG). Through the port
they behave as one gateway:
- jobs, waiters and webhooks live in Redis, as with several gateways;
- /metrics adds every process's own counters (prometheus_client's multiprocess files, in a
  folder of this server's that it holds a lock on), so any process answers the same totals;
- the processes hold the system-series exporter lease under one server id, and only the server
  gives it up when it stops, so every scrape of the port carries the system series or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI
from redis.exceptions import RedisError
from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from gateway.app import create_app
from gateway.metrics import GatewayMetrics, replica_id
from shared import tracing
from shared.logs import configure_logging
from shared.procs import die_with_parent
from shared.redisconn import connect
from shared.settings import Settings

log = logging.getLogger(__name__)

CORES_PER_PROCESS = 4  # the rest are the batcher's, the workers', Redis's and the clients'
MAX_AUTO_PROCESSES = 4
# What the server hands its processes (serve_one, an entry point, reads them; nothing deeper).
SERVER_ID_ENV = "ASYNCINFER_GATEWAY_SERVER_ID"
PARENT_PID_ENV = "ASYNCINFER_GATEWAY_PARENT_PID"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it
METRICS_DIR_PREFIX = "asyncinfer-gateway-metrics-"
OWNER_LOCK = ".owner"  # flock'd by the live server: a folder whose lock is free is a dead one's
APP_FACTORY = "gateway.servers:serve_one"


def server_processes(requested: int, cores: int) -> int:
    """How many processes serve the port: `requested`, or for 0 one per CORES_PER_PROCESS
    cores, at least 1 and at most MAX_AUTO_PROCESSES."""
    if requested > 0:
        return requested
    return max(1, min(MAX_AUTO_PROCESSES, cores // CORES_PER_PROCESS))


def sweep_metrics_folders(tmp: Path) -> None:
    """Remove the folders of servers that died without cleaning up (kill -9): those whose
    owner lock nobody holds. A folder without its lock file yet is left alone."""
    for path in tmp.glob(f"{METRICS_DIR_PREFIX}*"):
        try:
            fd = os.open(path / OWNER_LOCK, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its server is alive
            continue
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def metrics_folder() -> Iterator[str]:
    """A fresh folder for this server's processes' metrics files, locked while it lives: counts
    left by an earlier server must not add to this one's."""
    sweep_metrics_folders(Path(tempfile.gettempdir()))
    path = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)
    fd = os.open(Path(path) / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def run_many(settings: Settings, processes: int) -> int:
    """Serve the port with `processes` processes until stopped; the exit status (uvicorn's
    STARTUP_FAILURE when a process could not start: it would fail the same way again)."""
    # A bad models file fails here, once, not in every process's restart loop.
    create_app(settings)
    server_id = replica_id()
    with metrics_folder() as folder:
        os.environ.update({METRICS_DIR_ENV: folder, SERVER_ID_ENV: server_id,
                           PARENT_PID_ENV: str(os.getpid())})
        config = Config(APP_FACTORY, factory=True, workers=processes,
                        host=settings.gateway_host, port=settings.gateway_port,
                        log_level=settings.log_level.lower(), access_log=False)
        sock = config.bind_socket()
        supervisor = Multiprocess(config, sockets=[sock])
        try:
            supervisor.run()
        finally:
            sock.close()
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        log.error("gateway stopped: a server process failed to start (its log says why)")
        return STARTUP_FAILURE
    asyncio.run(_release_lease(settings, server_id))
    return 0


async def _release_lease(settings: Settings, server_id: str) -> None:
    # The processes share the lease, so none of them gives it up; the server does, last.
    try:
        redis = connect(settings)
        try:
            await GatewayMetrics(redis, {}, server_id=server_id).release()
        finally:
            await redis.aclose()
    except (RedisError, OSError) as exc:  # it lapses on its own
        log.warning("exporter lease not released error=%s", type(exc).__name__)


def serve_one() -> FastAPI:
    """One of several server processes (uvicorn calls this in each): the app a lone process
    serves, built from the environment its server set."""
    try:
        die_with_parent()
        if str(os.getppid()) != os.environ[PARENT_PID_ENV]:
            raise RuntimeError("its server died before it started")
        settings = Settings()
        configure_logging(settings.log_level)
        tracing.setup("gateway")  # only if OTEL_* variables ask for traces
        return create_app(settings, server_id=os.environ[SERVER_ID_ENV],
                          metrics_dir=os.environ[METRICS_DIR_ENV])
    except Exception:
        # STARTUP_FAILURE, not uvicorn's 1: its supervisor then stops instead of restarting
        # a process that would fail again.
        logging.basicConfig()
        log.exception("gateway server process failed to start (run it through "
                      "`python -m gateway`)")
        sys.exit(STARTUP_FAILURE)

