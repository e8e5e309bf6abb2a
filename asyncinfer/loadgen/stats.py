"""A run's summary: what was offered, what was served, how fast, and where the time went.

Statistics cover the jobs that arrived after the warm-up and before the end of the arrivals;
throughput counts successful completions inside that window. Goodput counts the jobs of the
window that succeeded within `slo_ms` of their arrival.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncinfer.loadgen.drive import Config, Recorder

# (arrived, finished) seconds from the start, status, batch size, job-record spans
Done = tuple[float, float, str, int | None, tuple[float, float, float] | None]
OK_STATUSES = frozenset({"succeeded", "accepted"})


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50, p90, p99, p99.9, mean and max (None for each when empty)."""
    if not values:
        return {k: None for k in ("p50", "p90", "p99", "p999", "mean", "max")}
    s = sorted(values)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    return {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
            "mean": sum(s) / len(s), "max": s[-1]}


def _breakdown(wall0: float, done: list[Done]) -> dict[str, float] | None:
    """Median time of each leg of a job, from the job record's wall-clock stamps (ms
    resolution): client to gateway record, queued (batcher, Celery, worker pick-up), running
    (worker: fetch, pre/predict/post, write), final state to the client's answer."""
    legs: dict[str, list[float]] = {"to_record": [], "queued": [], "running": [],
                                    "to_client": []}
    for arrived, finished, _, _, spans in done:
        if spans is None:
            continue
        created, started, final = spans
        legs["to_record"].append(created - (wall0 + arrived))
        legs["queued"].append(started - created)
        legs["running"].append(final - started)
        legs["to_client"].append(wall0 + finished - final)
    if not legs["queued"]:
        return None
    return {k: statistics.median(v) * 1000 for k, v in legs.items()}


def summarize(cfg: Config, rec: Recorder, elapsed_s: float, cpu_s: float,
              unfinished_at: float, retries: int = 0) -> dict[str, Any]:
    lo, hi = cfg.warmup_s, cfg.duration_s
    window = max(1e-9, hi - lo)
    measured = [d for d in rec.done if lo <= d[0] < hi]
    ok = [d for d in measured if d[2] in OK_STATUSES]
    ok_in_window = sum(1 for d in rec.done if d[2] in OK_STATUSES and lo <= d[1] < hi)
    statuses = Counter(d[2] for d in measured)
    lat_ok = [(d[1] - d[0]) * 1000 for d in ok]
    arrived = sum(1 for a in rec.arrivals if lo <= a < hi)
    unfinished = max(0, arrived - len(measured))
    if unfinished:
        statuses["unfinished"] = unfinished
    # Latency with unfinished jobs counted as (end of the drain - arrival): a lower bound.
    unfinished_lat = [(unfinished_at - rec.t0 - lo) * 1000] * unfinished
    sizes = Counter(d[3] for d in measured if d[3] is not None)
    n_sizes = sum(sizes.values())
    result: dict[str, Any] = {
        "config": asdict(cfg) | {"headers": sorted(cfg.headers)},  # names only: no secrets
        "elapsed_s": elapsed_s,
        "window_s": window,
        "arrived": arrived,
        "offered_per_s": arrived / window,
        "completed": len(measured),
        "throughput_per_s": ok_in_window / window,
        "status_counts": dict(statuses),
        "ok_fraction": (len(ok) / arrived) if arrived else 0.0,
        "latency_ms": percentiles(lat_ok),
        "latency_ms_with_unfinished": percentiles(lat_ok + unfinished_lat),
        "batch_size": {
            "mean": (sum(k * v for k, v in sizes.items()) / n_sizes) if n_sizes else None,
            "hist": {str(k): v for k, v in sorted(sizes.items())},
        },
        "breakdown_ms": _breakdown(rec.wall0, ok),
        # How late the generator itself issued open-loop arrivals (its own share of latency).
        "issue_lag_ms": {k: v for k, v in percentiles([x * 1000 for x in rec.lags]).items()
                         if k in ("p50", "p99", "max")},
        "dropped": rec.dropped,
        "error_samples": rec.errors,
        "requests": rec.requests,
        "client_retries": retries,
        "client_cpu_s": cpu_s,
        "client_cpu_us_per_request": (cpu_s / rec.requests * 1e6) if rec.requests else None,
        "client_cpu_fraction": cpu_s / elapsed_s if elapsed_s else None,
        "jobs_total": len(rec.done),
        "succeeded_total": sum(1 for d in rec.done if d[2] in OK_STATUSES),
    }
    if cfg.slo_ms is not None:
        within = sum(1 for x in lat_ok if x <= cfg.slo_ms)
        result["slo_ms"] = cfg.slo_ms
        result["goodput_per_s"] = within / window
        result["within_slo_fraction"] = (within / arrived) if arrived else 0.0
    return result
