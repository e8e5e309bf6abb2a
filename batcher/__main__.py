"""`python -m batcher`: one batcher process serving every configured model."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable

from batcher.cork import CorkPolicy
from batcher.lease import Lease, serve_while_leader
from batcher.policy import BatchingPolicy, PolicyConfig
from batcher.service import ModelBatcher
from shared import eventloop, tracing
from shared.celeryapp import make_celery
from shared.logs import configure_logging
from shared.modelspec import load_specs
from shared.redisconn import connect
from shared.settings import Settings
from shared.store import JobStore

log = logging.getLogger(__name__)


def cork_policy(config: PolicyConfig) -> BatchingPolicy:
    return CorkPolicy(config, time.monotonic)


def _dump_tasks() -> None:
    """SIGUSR1: log where every task is waiting (for diagnosing a stuck batcher)."""
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=8)
        where = " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in reversed(frames))
        log.info("task name=%s at=%s", task.get_name(), where)


async def _run(make: Callable[[Lease], ModelBatcher], lease: Lease) -> None:
    # A fresh batcher each time the lease is won: no state survives a lost leadership.
    await make(lease).run()


async def serve(settings: Settings) -> None:
    """Run a leader-elected batcher for every model until SIGTERM/SIGINT."""
    specs = load_specs(settings.models)
    consumer = f"b-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    redis = connect(settings)
    celery = make_celery(settings)
    store = JobStore(redis, result_ttl_s=settings.result_ttl_s, job_ttl_s=settings.job_ttl_s,
                     max_attempts=settings.max_attempts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    log.info("batcher starting consumer=%s models=%s", consumer, ",".join(specs))
    tasks: list[asyncio.Task[None]] = []
    leases: list[Lease] = []
    for spec in specs.values():
        batcher = functools.partial(ModelBatcher, settings, spec, redis,
                                    connect(settings, block_s=2.0), celery, store, cork_policy,
                                    consumer)
        lease = Lease(redis, spec.name, consumer, settings.lease_ttl_s)
        leases.append(lease)
        tasks.append(asyncio.create_task(
            serve_while_leader(lease, functools.partial(_run, batcher))))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [r for r in results
              if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if errors:
        raise errors[0]
    for lease in leases:
        await lease.release()
    await redis.aclose()
    log.info("batcher stopped consumer=%s", consumer)


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    tracing.setup("batcher")  # only if OTEL_* variables ask for traces
    eventloop.run(serve(settings))


if __name__ == "__main__":
    main()
