"""`python -m gateway`: serve the HTTP API with uvicorn, in one process or in several that share
the port (`gateway_processes`, gateway.servers)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from gateway.app import create_app
from gateway.servers import run_many, server_processes
from shared import tracing
from shared.devices import host_cores
from shared.logs import configure_logging
from shared.settings import Settings

log = logging.getLogger(__name__)


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    n = server_processes(settings.gateway_processes, host_cores())
    log.info("gateway serving processes=%d host=%s port=%d", n, settings.gateway_host,
             settings.gateway_port)
    if n > 1:
        sys.exit(run_many(settings, n))
    tracing.setup("gateway")  # only if OTEL_* variables ask for traces
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                log_level=settings.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
