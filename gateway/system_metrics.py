"""The system-wide series of /metrics: what Redis and the batchers' published states say about
each model, read at scrape time and exported by one gateway replica only (see
`gateway.metrics`), so summing over replicas never counts a queue twice.

Naming follows Prometheus' conventions: one metric per quantity, its base unit in the name
(`_seconds`, `_rows`, `_jobs`, `_batches`, `_workers`, `_lanes`), counters end in `_total`, and a
label only splits a quantity into parts that add up (status, state, reason), never selects what
the value means.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shared import keys
from shared.heartbeats import live_workers
from shared.histograms import END_TO_END, RUN, Buckets, read_buckets
from shared.launchstate import model_launchers, role_restarts

WORKER_STATES = ("starting", "ready", "busy", "draining")
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# (metric, help, key in the batcher's published state, factor to the base unit)
BATCHER_GAUGES: tuple[tuple[str, str, str, float], ...] = (
    ("asyncinfer_batcher_queue_rows", "Rows the batcher has read ahead and not dispatched",
     "queue_rows", 1),
    ("asyncinfer_batcher_held_jobs", "Jobs the batcher has read ahead and not dispatched",
     "held", 1),
    ("asyncinfer_batcher_suspect_jobs", "Jobs of dead workers' batches waiting to run again "
     "apart", "suspects", 1),
    ("asyncinfer_batcher_in_flight_batches", "Batches dispatched whose predict is not over",
     "in_flight", 1),
    ("asyncinfer_batcher_lanes", "Predict lanes of the live workers", "lanes", 1),
    ("asyncinfer_batcher_free_lanes", "Predict lanes free now", "free_lanes", 1),
    ("asyncinfer_batcher_wait_seconds", "How long the CORK policy expects waiting for more "
     "requests to pay", "avg_wait_ms", 1e-3),
    ("asyncinfer_batcher_drain_rows_per_second", "Rows completed per second over the last 30 s",
     "drain_rows_per_s", 1),
    ("asyncinfer_batcher_row_cost_seconds", "Fitted cost of one more row in a batch (a of a*n+b)",
     "a_s", 1),
    ("asyncinfer_batcher_batch_cost_seconds", "Fitted fixed cost of a batch (b of a*n+b)",
     "b_s", 1),
    ("asyncinfer_batcher_overhead_seconds", "Fitted time around a predict (dispatch, tail)",
     "overhead_s", 1),
    ("asyncinfer_batcher_answer_leg_seconds", "Final write to the answer of a waiting client, "
     "99th percentile of the slowest gateway", "answer_leg_ms", 1e-3),
    ("asyncinfer_batcher_lead_seconds", "Dispatch to predict start as the batcher sees it, "
     "smoothed", "lead_ms", 1e-3),
    ("asyncinfer_batcher_handoff_median_seconds", "Median over the last 50 batches of the "
     "hand-off from the batcher's send to the task starting in a worker", "handoff_ms_p50", 1e-3),
)
# (metric without _total, help, key in the published state); they restart at 0 with a new
# batcher term, which rate() reads as a counter reset.
BATCHER_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("asyncinfer_batcher_worker_deaths", "Workers the batcher found dead", "worker_deaths"),
    ("asyncinfer_batcher_requeued_jobs", "Jobs taken back from dead workers and queued again",
     "requeued"),
    ("asyncinfer_batcher_suspect_batches", "Batches of suspect jobs run apart",
     "suspect_batches"),
)
# (metric, help, key in the autoscaler's last decision)
AUTOSCALER_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("asyncinfer_autoscaler_desired_workers", "Workers the last scaling decision wanted",
     "desired"),
    ("asyncinfer_autoscaler_live_workers", "Serving workers the last decision counted", "live"),
    ("asyncinfer_autoscaler_starting_workers", "Starting workers the last decision counted",
     "starting"),
    ("asyncinfer_autoscaler_queued_jobs", "Queued jobs the last decision counted", "queued"),
    ("asyncinfer_autoscaler_in_flight_jobs", "Running jobs the last decision counted",
     "in_flight"),
)


@dataclass
class ModelSnapshot:
    """What Redis holds about one model at one scrape."""

    model: str
    queue_jobs: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)
    batcher: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)
    latencies: dict[str, str] = field(default_factory=dict)
    launchers: list[dict[str, Any]] = field(default_factory=list)  # live autoscalers' states


@dataclass
class Snapshot:
    """The whole system at one scrape."""

    models: list[ModelSnapshot]
    role_restarts: dict[str, int] = field(default_factory=dict)  # of `asyncinfer up`'s roles


async def read_snapshot(redis: aioredis.Redis, models: Sequence[str]) -> Snapshot:
    out: list[ModelSnapshot] = []
    for model in models:
        pipe = redis.pipeline(transaction=False)
        for stream in keys.streams(model):
            pipe.xlen(stream)
        pipe.hgetall(keys.stats(model))
        pipe.get(keys.batcher_state(model))
        pipe.lindex(keys.scale_history(model), 0)
        pipe.hgetall(keys.job_latencies(model))
        *lens, stats, state_raw, decision_raw, latencies = await pipe.execute()
        by_state = dict.fromkeys(WORKER_STATES, 0)
        for w in await live_workers(redis, model):
            by_state[w["state"]] = by_state.get(w["state"], 0) + 1
        out.append(ModelSnapshot(
            model, sum(lens), {s: int(n) for s, n in stats.items()}, by_state,
            json.loads(state_raw) if state_raw else {},
            json.loads(decision_raw) if decision_raw else {}, latencies,
            await model_launchers(redis, model)))
    return Snapshot(out, await role_restarts(redis))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


class SystemCollector(Collector):
    """prometheus_client collector over snapshots taken just before."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.snapshots = snapshot.models

    def collect(self) -> Iterator[Metric]:
        yield from self._jobs()
        yield from self._batcher()
        yield from self._autoscaler()
        yield from self._histograms()
        yield from self._supervision()

    def _supervision(self) -> Iterator[Metric]:
        restarts = CounterMetricFamily("asyncinfer_worker_restarts", "Workers that exited "
                                       "unasked and were started again (summed over the "
                                       "autoscalers alive now)", labels=["model"])
        failed = GaugeMetricFamily("asyncinfer_launch_failed_autoscalers", "Autoscalers that "
                                   "gave up starting the model's workers (they keep dying "
                                   "before serving)", labels=["model"])
        for s in self.snapshots:
            restarts.add_metric([s.model], sum(int(e.get("restarts", 0)) for e in s.launchers))
            failed.add_metric([s.model], sum(1 for e in s.launchers if e.get("state") == "failed"))
        roles = CounterMetricFamily("asyncinfer_role_restarts", "Restarts of the processes "
                                    "`asyncinfer up` supervises", labels=["role"])
        for role, n in sorted(self.snapshot.role_restarts.items()):
            roles.add_metric([role], n)
        yield from (restarts, failed, roles)

    def _jobs(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("asyncinfer_queue_jobs", "Jobs queued or running (entries in "
                                  "the model's streams)", labels=["model"])
        finished = CounterMetricFamily("asyncinfer_jobs_finished", "Jobs that reached a final "
                                       "status (kept in Redis, all processes)",
                                       labels=["model", "status"])
        workers = GaugeMetricFamily("asyncinfer_workers", "Live workers by heartbeat state",
                                    labels=["model", "state"])
        for s in self.snapshots:
            depth.add_metric([s.model], s.queue_jobs)
            for status, n in sorted(s.finished.items()):
                finished.add_metric([s.model, status], n)
            for state, n in s.workers.items():
                workers.add_metric([s.model, state], n)
        yield from (depth, finished, workers)

    def _per_model(self, family: GaugeMetricFamily | CounterMetricFamily,
                   pick: Callable[[ModelSnapshot], dict[str, Any]], key: str,
                   factor: float = 1.0) -> Metric:
        """`family` with one sample per model: the number at `key` of what `pick` chooses from
        its snapshot (models without one are left out)."""
        for s in self.snapshots:
            value = _number(pick(s).get(key))
            if value is not None:
                family.add_metric([s.model], value * factor)
        return family

    def _batcher(self) -> Iterator[Metric]:
        for name, doc, key, factor in BATCHER_GAUGES:
            yield self._per_model(GaugeMetricFamily(name, doc, labels=["model"]),
                                  lambda s: s.batcher, key, factor)
        for name, doc, key in BATCHER_COUNTERS:
            yield self._per_model(CounterMetricFamily(name, doc, labels=["model"]),
                                  lambda s: s.batcher, key)
        batches = CounterMetricFamily("asyncinfer_batcher_batches", "Batches dispatched, by the "
                                      "reason of their release", labels=["model", "reason"])
        shed = CounterMetricFamily("asyncinfer_batcher_shed_jobs", "Jobs the batcher ended "
                                   "without running them (expired, overloaded)",
                                   labels=["model", "reason"])
        for s in self.snapshots:
            for reason, n in sorted((s.batcher.get("dispatch_reasons") or {}).items()):
                batches.add_metric([s.model, reason], n)
            for reason, n in sorted((s.batcher.get("shed_jobs") or {}).items()):
                shed.add_metric([s.model, reason], n)
        yield from (batches, shed)

    def _autoscaler(self) -> Iterator[Metric]:
        for name, doc, key in AUTOSCALER_GAUGES:
            yield self._per_model(GaugeMetricFamily(name, doc, labels=["model"]),
                                  lambda s: s.decision, key)

    def _histograms(self) -> Iterator[Metric]:
        rows = HistogramMetricFamily("asyncinfer_batch_size_rows", "Rows per dispatched batch",
                                     labels=["model"])
        wait = HistogramMetricFamily("asyncinfer_job_queue_wait_seconds", "Wait of a job from "
                                     "submit to the dispatch of its batch", labels=["model"])
        run = HistogramMetricFamily("asyncinfer_job_run_seconds", "Run time of a job's batch on "
                                    "its worker (preprocess to final write)", labels=["model"])
        e2e = HistogramMetricFamily("asyncinfer_job_end_to_end_seconds", "Submit to final state "
                                    "of the jobs that ran", labels=["model"])
        for s in self.snapshots:
            sizes = {int(k): int(v) for k, v in (s.batcher.get("batch_rows") or {}).items()}
            if sizes:
                cum = [sum(n for size, n in sizes.items() if size <= b)
                       for b in BATCH_ROWS_BUCKETS]
                rows.add_metric([s.model], [*((str(float(b)), c) for b, c in
                                              zip(BATCH_ROWS_BUCKETS, cum, strict=True)),
                                            ("+Inf", sum(sizes.values()))],
                                sum(size * n for size, n in sizes.items()))
            q = s.batcher.get("queue_wait")
            if q and sum(q["counts"]):
                waits = Buckets(tuple(q["buckets_s"]), list(q["counts"]), q["sum_s"])
                wait.add_metric([s.model], waits.cumulative(), waits.sum)
            for family, name in ((run, RUN), (e2e, END_TO_END)):
                b = read_buckets(s.latencies, name)
                if b is not None:
                    family.add_metric([s.model], b.cumulative(), b.sum)
        yield from (rows, wait, run, e2e)
