"""`python -m gateway`: serve the HTTP API with uvicorn."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from shared import tracing
from shared.logs import configure_logging
from shared.settings import Settings


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    tracing.setup("gateway")  # only if OTEL_* variables ask for traces
    uvicorn.run(create_app(settings), host=settings.gateway_host, port=settings.gateway_port,
                log_level=settings.log_level.lower(), access_log=False)


if __name__ == "__main__":
    main()
