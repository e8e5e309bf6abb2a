"""`python -m workers --model NAME [--index N]`: one worker process for one model and device.

The index defaults to $WORKER_INDEX (set by launchers), else 1.
"""

from __future__ import annotations

import argparse
import logging
import os

from shared import tracing
from shared.logs import configure_logging
from shared.settings import Settings
from workers.process import main


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", type=int, default=int(os.environ.get("WORKER_INDEX", "1")))
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.log_level)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Celery logs every task at INFO, received and succeeded: two lines per batch, most of
        # the log at hundreds of batches a second, and ~45 µs each on the thread that hands the
        # batch over (one before the task body runs). A failing task still logs at ERROR.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    tracing.setup("worker")  # only if OTEL_* variables ask for traces
    logging.getLogger(__name__).info("worker starting model=%s index=%d", args.model, args.index)
    main(settings, args.model, args.index)


if __name__ == "__main__":
    cli()
