"""How good are the ETAs of queued jobs, and how fast is a deadline refused?

    python -m bench.eta_accuracy     # about a minute; writes docs/bench-data/cpu/eta.json

One `asyncinfer up` stack serving the synthetic model (2 ms/row + 10 ms, `max_batch_size` 32,
one worker: capacity about 430 jobs/s). For each offered load (50% and 90% of that capacity,
fixed-rate arrivals, `Prefer`-less submits), every 202 carries the job's ETA at submit; once the
job is final, its actual finish is compared with the predicted one. Reported: the median (and
p90) of |predicted - actual finish| relative to the job's actual wait (submit to finish), and the
median absolute error in ms. Then, under saturation, jobs with a deadline the queue cannot meet
are submitted and the time to their `429 deadline_unmeetable` is measured (p50, p99), with how
many accepted deadline jobs missed their deadline by more than the model's a + b.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.docs import REPO
from bench.systems import OursStack, model_table

A_S, B_S, ROWS = 0.002, 0.010, 32
CAPACITY = ROWS / (A_S * ROWS + B_S)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _load(client: httpx.AsyncClient, rate: float, seconds: float) -> list[dict[str, Any]]:
    """Fixed-rate submits; returns the 202 bodies (with their ETA at submit)."""
    answers: list[dict[str, Any]] = []

    async def one() -> None:
        r = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}})
        if r.status_code == 202:
            answers.append(r.json())

    tasks = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return answers


async def _accuracy(client: httpx.AsyncClient, fraction: float, seconds: float) -> dict[str, Any]:
    rate = fraction * CAPACITY
    answers = await _load(client, rate, seconds)
    errors_rel, errors_ms = [], []
    for body in answers:
        if not body.get("eta"):
            continue
        done = (await client.get(f"/v1/jobs/{body['id']}", params={"wait": 30})).json()
        if done.get("status") != "succeeded":
            continue
        actual = _epoch(done["finished_at"])
        predicted = _epoch(body["eta"]["finish_at"])
        wait = max(1e-3, actual - _epoch(body["created_at"]))
        errors_ms.append(1000 * abs(predicted - actual))
        errors_rel.append(abs(predicted - actual) / wait)
    return {"load": fraction, "offered_per_s": round(rate, 1), "jobs": len(errors_rel),
            "median_error_relative_to_wait": round(statistics.median(errors_rel), 3),
            "p90_error_relative_to_wait": round(_quantile(errors_rel, 0.9), 3),
            "median_error_ms": round(statistics.median(errors_ms), 2)}


async def _admission(client: httpx.AsyncClient) -> dict[str, Any]:
    """Saturate with a backlog, then submit deadline jobs: time the refusals, check the
    accepted."""
    await client.post("/v1/models/synthetic/jobs:batch",
                      json={"inputs": [{"x": i} for i in range(2000)]})
    refused_ms: list[float] = []
    accepted: list[tuple[dict[str, Any], int]] = []
    for i in range(200):
        deadline_ms = 100 if i % 4 else 8000  # mostly unmeetable, some generous
        t0 = time.monotonic()
        r = await client.post("/v1/models/synthetic/jobs",
                              json={"input": {"x": 1}, "deadline_ms": deadline_ms})
        took = 1000 * (time.monotonic() - t0)
        if r.status_code == 429 and r.json()["error"]["type"] == "deadline_unmeetable":
            refused_ms.append(took)
        elif r.status_code == 202:
            accepted.append((r.json(), deadline_ms))
        await asyncio.sleep(0.005)
    info = (await client.get("/v1/models/synthetic")).json()
    grace_s = (info.get("a") or A_S) + (info.get("b") or B_S)
    late = 0
    for body, deadline_ms in accepted:
        done = (await client.get(f"/v1/jobs/{body['id']}", params={"wait": 30})).json()
        finished = done.get("finished_at")
        if done.get("status") != "succeeded" or finished is None or (
                _epoch(finished) - _epoch(body["created_at"]) > deadline_ms / 1000 + grace_s):
            late += 1
    return {"refused": len(refused_ms), "refusal_ms_p50": round(_quantile(refused_ms, 0.5), 2),
            "refusal_ms_p99": round(_quantile(refused_ms, 0.99), 2), "accepted": len(accepted),
            "accepted_late_by_more_than_a_plus_b": late}


async def _main(url: str, seconds: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=500)) as client:
        await _load(client, 20, 2)  # warm up: probes, a fitted model
        await asyncio.sleep(2)
        loads = [await _accuracy(client, f, seconds) for f in (0.5, 0.9)]
        return {"eta": loads, "admission": await _admission(client)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="per offered load")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench-data" / "cpu" / "eta.json")
    args = ap.parse_args(argv)
    models = model_table("synthetic", "workers.builtin.synthetic:SyntheticModel", 1,
                         max_batch_size=ROWS, max_latency_ms=200, max_queue=100_000)
    work = Path("/tmp/asyncinfer-eta")
    shutil.rmtree(work, ignore_errors=True)  # a fresh Redis: no backlog of an earlier run
    with OursStack(work, devices="cpu:1", workers=1, models=models) as stack:
        result = asyncio.run(_main(stack.url, args.seconds))
    result["model"] = {"a_ms": 1000 * A_S, "b_ms": 1000 * B_S, "max_batch_size": ROWS,
                       "capacity_per_s": round(CAPACITY, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
