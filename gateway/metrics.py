"""Prometheus metrics at the gateway: its own request figures, plus the system view (queue depth,
workers, batcher fit, jobs by final status) read from Redis at scrape time."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily

from shared import keys
from shared.heartbeats import live_workers
from shared.launchstate import model_launchers, role_restarts
from shared.modelspec import ModelSpec

SUBMIT_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _Histograms:
    """Batch size and queue wait histograms, rebuilt from each batcher's published state."""

    def __init__(self, states: dict[str, dict[str, Any]]) -> None:
        self.states = states

    def collect(self) -> Iterator[HistogramMetricFamily]:
        sizes = HistogramMetricFamily("asyncinfer_batch_rows", "Rows per dispatched batch",
                                      labels=["model"])
        waits = HistogramMetricFamily("asyncinfer_queue_wait_seconds",
                                      "Submit to dispatch wait", labels=["model"])
        for model, state in self.states.items():
            rows = {int(k): int(v) for k, v in (state.get("batch_rows") or {}).items()}
            if rows:
                bounds = sorted(rows)
                cum = list(itertools.accumulate(rows[b] for b in bounds))
                sizes.add_metric([model], [(str(float(b)), c) for b, c in zip(bounds, cum,
                                                                               strict=True)]
                                 + [("+Inf", cum[-1])], sum(b * n for b, n in rows.items()))
            wait = state.get("queue_wait")
            if wait:
                cum = list(itertools.accumulate(wait["counts"]))
                buckets = [(str(b), c) for b, c in zip(wait["buckets_s"], cum, strict=False)]
                waits.add_metric([model], [*buckets, ("+Inf", cum[-1])], wait["sum_s"])
        yield sizes
        yield waits


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
        self.autoscaler = Gauge("asyncinfer_autoscaler", "Inputs and output of the last scaling "
                                "decision", ["model", "value"], registry=r)
        self.worker_restarts = Gauge("asyncinfer_worker_restarts", "Workers that exited unasked "
                                     "(all autoscalers alive now)", ["model"], registry=r)
        self.model_failed = Gauge("asyncinfer_model_launch_failed", "Autoscalers that gave up "
                                  "starting the model's workers (they keep dying before "
                                  "serving)", ["model"], registry=r)
        self.role_restarts = Gauge("asyncinfer_role_restarts", "Restarts of the processes "
                                   "`asyncinfer up` supervises", ["role"], registry=r)
        self.dispatches = Gauge("asyncinfer_batcher_dispatches", "Batches released by reason",
                                ["model", "reason"], registry=r)

    def submitted(self, model: str, n: int, seconds: float) -> None:
        self.jobs_submitted.labels(model).inc(n)
        self.submit_seconds.labels(model).observe(seconds)

    async def render(self) -> bytes:
        states: dict[str, dict[str, Any]] = {}
        for model in self.specs:
            pipe = self.redis.pipeline(transaction=False)
            for stream in keys.streams(model):
                pipe.xlen(stream)
            pipe.hgetall(keys.stats(model))
            pipe.get(keys.batcher_state(model))
            pipe.lindex(keys.scale_history(model), 0)
            *lens, stats, state_raw, decision_raw = await pipe.execute()
            if decision_raw:
                decision = json.loads(decision_raw)
                for name in ("desired", "live", "starting", "queued", "in_flight"):
                    self.autoscaler.labels(model, name).set(decision[name])
            self.queue_depth.labels(model).set(sum(lens))
            for status, count in stats.items():
                self.jobs_final.labels(model, status).set(int(count))
            by_state = {"starting": 0, "ready": 0, "busy": 0, "draining": 0}
            for w in await live_workers(self.redis, model):
                by_state[w["state"]] = by_state.get(w["state"], 0) + 1
            for worker_state, n in by_state.items():
                self.workers.labels(model, worker_state).set(n)
            launchers = await model_launchers(self.redis, model)
            self.worker_restarts.labels(model).set(sum(int(e.get("restarts", 0))
                                                       for e in launchers))
            self.model_failed.labels(model).set(sum(1 for e in launchers
                                                    if e.get("state") == "failed"))
            state = json.loads(state_raw) if state_raw else {}
            states[model] = state
            for name in ("a_s", "b_s", "avg_wait_ms", "in_flight", "queue_rows", "slots",
                         "drain_rows_per_s", "handoff_ms_p50"):
                if isinstance(state.get(name), int | float):
                    self.batcher.labels(model, name).set(state[name])
            for reason, n in (state.get("dispatch_reasons") or {}).items():
                self.dispatches.labels(model, reason).set(n)
        for role, n in (await role_restarts(self.redis)).items():
            self.role_restarts.labels(role).set(n)
        return generate_latest(self.registry) + generate_latest(_Histograms(states))
