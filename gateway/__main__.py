"""`python -m gateway`: serve the HTTP API with uvicorn, in one process or in several that share
the port (`gateway_processes`).

One Python process answers about one core's worth of HTTP requests; on a GPU host with many
cores that, not the GPU, caps the jobs per second. Several processes behind one port lift it
without a proxy. uvicorn's supervisor starts them, restarts any that dies, and stops them with
itself. They share what a client or a scraper sees through the port:
- the job records, waiters and webhooks live in Redis, as with several gateways;
- /metrics adds every process's own counters (prometheus_client's multiprocess files in a folder
  of this server's), so any process answers the same totals;
- the processes hold the system-series exporter lease under one server id, so every scrape of
  the port carries the system series or none.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from shared import tracing
from shared.devices import host_cores
from shared.logs import configure_logging
from shared.procs import die_with_parent
from shared.settings import Settings

log = logging.getLogger(__name__)

CORES_PER_PROCESS = 4  # the rest are the batcher's, the workers', Redis's and the clients'
MAX_AUTO_PROCESSES = 4
# What the server hands its processes (an entry point reads them, nothing deeper does).
SERVER_ID_ENV = "ASYNCINFER_GATEWAY_SERVER_ID"
PARENT_PID_ENV = "ASYNCINFER_GATEWAY_PARENT_PID"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own name for it
METRICS_DIR_PREFIX = "asyncinfer-gateway-metrics-"  # then the server's pid


def server_processes(requested: int, cores: int) -> int:
    """How many processes serve the port: `requested`, or for 0 one per CORES_PER_PROCESS
    cores, at least 1 and at most MAX_AUTO_PROCESSES."""
    if requested > 0:
        return requested
    return max(1, min(MAX_AUTO_PROCESSES, cores // CORES_PER_PROCESS))


def _sweep_metrics_dirs(tmp: Path) -> None:
    """Remove the folders of servers that died without cleaning up (kill -9)."""
    for path in tmp.glob(f"{METRICS_DIR_PREFIX}*"):
        pid = path.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    n = server_processes(settings.gateway_processes, host_cores())
    host, port, level = settings.gateway_host, settings.gateway_port, settings.log_level.lower()
    if n == 1:
        tracing.setup("gateway")  # only if OTEL_* variables ask for traces
        uvicorn.run(create_app(settings), host=host, port=port, log_level=level,
                    access_log=False)
        return
    # A fresh folder per server: counts left by an earlier server must not add to this one's.
    _sweep_metrics_dirs(Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-") as metrics_dir:
        os.environ[METRICS_DIR_ENV] = metrics_dir
        os.environ[SERVER_ID_ENV] = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        os.environ[PARENT_PID_ENV] = str(os.getpid())
        log.info("gateway serving processes=%d host=%s port=%d", n, host, port)
        uvicorn.run("gateway.__main__:serve_one", factory=True, workers=n, host=host, port=port,
                    log_level=level, access_log=False)


def serve_one() -> FastAPI:
    """One of several server processes (uvicorn calls this in each): the app `main` serves
    alone, built from the environment the server set."""
    die_with_parent()
    if str(os.getppid()) != os.environ.get(PARENT_PID_ENV):  # it died before the line above
        sys.exit(1)
    settings = Settings()
    configure_logging(settings.log_level)
    tracing.setup("gateway")
    return create_app(settings, server_id=os.environ[SERVER_ID_ENV],
                      metrics_dir=os.environ[METRICS_DIR_ENV])


if __name__ == "__main__":
    main()
