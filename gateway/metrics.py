"""Prometheus metrics at the gateway: this replica's own request figures, and the system-wide
series (`gateway.system_metrics`) from the one replica that holds the exporter lease.

Every replica answers /metrics; only the exporter (`keys.metrics_exporter`, taken and renewed at
its scrapes) adds the system-wide series, and `asyncinfer_gateway_system_exporter` says which
one does. So a query summing over replicas counts each queue once; when the exporter goes away
another replica takes over within `keys.METRICS_EXPORTER_TTL_S`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator

import redis.asyncio as aioredis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.system_metrics import SystemCollector, read_snapshot
from shared import keys
from shared.modelspec import ModelSpec

log = logging.getLogger(__name__)
SUBMIT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# The `_created` series prometheus_client adds by default double every counter and histogram
# for a timestamp nobody graphs.
disable_created_metrics()  # type: ignore[no-untyped-call]


def replica_id() -> str:
    """A name for one gateway replica (a process, or a server of several) in the exporter
    lease: unique per start."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class _Exporter:
    """asyncinfer_gateway_system_exporter, made at each scrape: a Gauge object would leave one
    series per process in the multiprocess files."""

    def __init__(self, value: bool) -> None:
        self.value = value

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("asyncinfer_gateway_system_exporter", "1 on the one gateway "
                                "replica that exports the system-wide series, else 0",
                                value=1 if self.value else 0)


class GatewayMetrics:
    """This replica's own series and, while it holds the exporter lease, the system's.

    A replica is one gateway server: one process, or several sharing a port (`server_id` names
    them all, `shared_dir` holds their prometheus_client multiprocess files, so each process's
    /metrics sums them all)."""

    def __init__(self, redis: aioredis.Redis, specs: dict[str, ModelSpec], *,
                 server_id: str | None = None, shared_dir: str | None = None) -> None:
        self.redis = redis
        self.specs = specs
        self.replica = server_id or replica_id()
        self.shared_dir = shared_dir
        self._warned = False
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter("asyncinfer_jobs_submitted", "Jobs accepted by this "
                                      "gateway", ["model"], registry=r)
        self.submit_seconds = Histogram("asyncinfer_submit_duration_seconds", "Submit handling "
                                        "time at this gateway (validation and one Redis round "
                                        "trip)", ["model"], buckets=SUBMIT_BUCKETS_S, registry=r)

    def submitted(self, model: str, n: int, seconds: float) -> None:
        try:
            self.jobs_submitted.labels(model).inc(n)
            self.submit_seconds.labels(model).observe(seconds)
        except OSError:  # a multiprocess file that cannot be written: the jobs are queued
            self._warn_once("submit", exc_info=True)

    def _warn_once(self, what: str, exc_info: bool = False) -> None:
        if not self._warned:
            self._warned = True
            log.warning("gateway metrics unavailable what=%s folder=%s", what, self.shared_dir,
                        exc_info=exc_info)

    async def exports_system(self) -> bool:
        """Take or renew the exporter lease; whether this replica holds it."""
        key = keys.metrics_exporter()
        ttl = keys.METRICS_EXPORTER_TTL_S
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(key, self.replica, nx=True, ex=ttl)
        pipe.get(key)
        _, holder = await pipe.execute()
        if holder != self.replica:
            return False
        await self.redis.expire(key, ttl)
        return True

    async def render(self) -> bytes:
        system = await self.exports_system()
        own = self.registry
        if self.shared_dir is not None:
            shared = CollectorRegistry()
            try:
                MultiProcessCollector(shared, path=self.shared_dir)  # type: ignore[no-untyped-call]
                own = shared
            except ValueError:  # the folder is gone: this process's own counts, not a 500
                self._warn_once("scrape")
        text = generate_latest(own) + generate_latest(_Exporter(system))
        if system:
            snapshot = await read_snapshot(self.redis, list(self.specs))
            text += generate_latest(SystemCollector(snapshot))
        return text

    async def release(self) -> None:
        """Give the exporter lease up at shutdown, so another replica exports at once."""
        key = keys.metrics_exporter()
        if await self.redis.get(key) == self.replica:
            await self.redis.delete(key)
