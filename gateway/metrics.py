"""Prometheus metrics at the gateway: its own request figures, plus the system view (queue depth,
workers, batcher fit, jobs by final status) read from Redis at scrape time."""

from __future__ import annotations

import json

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared import keys
from shared.heartbeats import live_workers
from shared.modelspec import ModelSpec

SUBMIT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class GatewayMetrics:
    def __init__(self, redis: aioredis.Redis, specs: dict[str, ModelSpec]) -> None:
        self.redis = redis
        self.specs = specs
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter("asyncinfer_jobs_submitted", "Jobs accepted", ["model"],
                                      registry=r)
        self.submit_seconds = Histogram("asyncinfer_submit_seconds", "Submit handling time",
                                        ["model"], buckets=SUBMIT_BUCKETS_S, registry=r)
        self.jobs_final = Gauge("asyncinfer_jobs_final", "Jobs that reached a final status",
                                ["model", "status"], registry=r)
        self.queue_depth = Gauge("asyncinfer_queue_depth", "Jobs queued or running", ["model"],
                                 registry=r)
        self.workers = Gauge("asyncinfer_workers", "Live workers by state", ["model", "state"],
                             registry=r)
        self.batcher = Gauge("asyncinfer_batcher", "Batcher live values", ["model", "value"],
                             registry=r)
        self.dispatches = Gauge("asyncinfer_batcher_dispatches", "Batches released by reason",
                                ["model", "reason"], registry=r)

    def submitted(self, model: str, n: int, seconds: float) -> None:
        self.jobs_submitted.labels(model).inc(n)
        self.submit_seconds.labels(model).observe(seconds)

    async def render(self) -> bytes:
        for model in self.specs:
            pipe = self.redis.pipeline(transaction=False)
            for p in ("high", "normal", "low"):
                pipe.xlen(keys.stream(model, p))
            pipe.hgetall(keys.stats(model))
            pipe.get(keys.batcher_state(model))
            *lens, stats, state_raw = await pipe.execute()
            self.queue_depth.labels(model).set(sum(lens))
            for status, count in stats.items():
                self.jobs_final.labels(model, status).set(int(count))
            states = {"starting": 0, "ready": 0, "busy": 0, "draining": 0}
            for w in await live_workers(self.redis, model):
                states[w["state"]] = states.get(w["state"], 0) + 1
            for state, n in states.items():
                self.workers.labels(model, state).set(n)
            state = json.loads(state_raw) if state_raw else {}
            for name in ("a_s", "b_s", "avg_wait_ms", "in_flight", "queue_rows", "slots",
                         "drain_rows_per_s"):
                if isinstance(state.get(name), int | float):
                    self.batcher.labels(model, name).set(state[name])
            for reason, n in (state.get("dispatch_reasons") or {}).items():
                self.dispatches.labels(model, reason).set(n)
        return generate_latest(self.registry)
