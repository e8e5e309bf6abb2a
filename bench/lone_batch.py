"""A worker's side of a lone job, in process: the event loop's path against the direct path.

One process plays a worker with the MLP on one torch thread: its I/O loop thread, its compute
thread, and the calling thread in Celery's place, which hands each batch over exactly as the
worker's task does (`LoopThread.spawn(run_batch)`, or `DirectPath.submit`). Against a private
Redis that fsyncs every write (`appendfsync always`, as `asyncinfer up` runs it), each round
holds one queued job for the worker's consumer (as a dispatch leaves it) and times the hand-over
to the final write, the two paths alternating. No HTTP, no batcher, no Celery message: steadier
than end-to-end figures on a shared machine. The result goes to
docs/bench-data/cpu/lone-batch.json; `python -m bench.report` puts its table into
docs/benchmarks.md.

    python -m bench.lone_batch [--rounds 600]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.docs import DOCS, emit_json
from bench.reporttext import lone_batch_table
from shared import keys
from shared.model import ModelContext
from shared.modelspec import load_specs
from shared.redisconn import connect, connect_sync
from shared.redisserver import RedisServer
from shared.settings import Settings
from shared.store import JobStore, NewJob
from shared.syncstore import BlockingWrites
from workers.direct import DirectPath
from workers.loop import LoopThread
from workers.runtime import BatchRequest, ModelRuntime

MODEL = "mlp"
WAYS = ("loop", "direct")
WARMUP = 20  # rounds of each way left out


def _rounds(url: str, rounds: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    settings = Settings(redis_url=url)
    spec = load_specs(None)[MODEL]
    loop = LoopThread()
    store = JobStore(connect(settings), result_ttl_s=60, job_ttl_s=60)
    consumer = keys.worker_consumer("lone-batch")
    runtime = ModelRuntime(spec, ModelContext(model=MODEL, worker_index=1, device="cpu",
                                              worker_name="lone-batch"), store,
                           consumer=consumer)
    runtime.load()
    direct = DirectPath(runtime, BlockingWrites(store, connect_sync(settings)))
    body = json.dumps({"features": [0.5] * 256})
    streams: dict[Any, Any] = {s: ">" for s in keys.streams(MODEL)}

    async def create() -> None:
        for stream in streams:
            await store.redis.xgroup_create(stream, keys.BATCHER_GROUP, id="0", mkstream=True)

    async def held() -> list[str]:
        ids = (await store.submit(MODEL, [NewJob(body)], max_queue=10**9)).ids
        await store.redis.xreadgroup(keys.BATCHER_GROUP, consumer, streams)
        return ids

    def through_loop(req: BatchRequest) -> None:
        loop.spawn(runtime.run_batch(req)).result(60)

    def through_direct(req: BatchRequest) -> None:
        if not direct.submit(req).result(60).done:
            raise RuntimeError(f"batch {req.batch_id} did not run to its end directly")

    runs: dict[str, Callable[[BatchRequest], None]] = {"loop": through_loop,
                                                       "direct": through_direct}
    wall: dict[str, list[float]] = {w: [] for w in WAYS}
    cpu: dict[str, list[float]] = {w: [] for w in WAYS}
    loop.call(create())
    for i in range(rounds):
        for way in WAYS:
            req = BatchRequest(MODEL, f"b-{way}-{i}", loop.call(held()))
            t0, c0 = time.perf_counter(), time.process_time()
            runs[way](req)
            wall[way].append((time.perf_counter() - t0) * 1000)
            cpu[way].append((time.process_time() - c0) * 1000)
    direct.writes.close()
    loop.call(store.redis.aclose())
    loop.stop()
    return {way: {"p50_ms": statistics.median(wall[way][WARMUP:]),
                  "p90_ms": statistics.quantiles(wall[way][WARMUP:], n=10)[-1],
                  "cpu_ms": statistics.mean(cpu[way][WARMUP:])} for way in WAYS}


def measure(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lone-batch-", dir=os.environ.get("TMPDIR")) as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            ways = _rounds(server.url, rounds)
        finally:
            server.stop()
    return {"at": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "rounds": rounds,
            "ways": ways}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=600)
    a = ap.parse_args(argv)
    res = measure(a.rounds)
    emit_json(res, DOCS / "bench-data" / "cpu" / "lone-batch.json")
    print(lone_batch_table(res))


if __name__ == "__main__":
    main()
