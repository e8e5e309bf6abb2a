"""Logging set-up for entry points only: one line per event, key=value fields."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s",
    )
