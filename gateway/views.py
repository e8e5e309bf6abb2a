"""The `/v1/models` view: static config joined with live values other processes publish."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from gateway.inputs import public_schema
from shared import keys
from shared.heartbeats import live_workers
from shared.launchstate import model_launchers
from shared.modelspec import ModelSpec


async def model_info(redis: aioredis.Redis, spec: ModelSpec,
                     faults: bool = False) -> dict[str, Any]:
    """Name, schemas, batching and scaling config, live workers, queue depth, fitted a and b.
    The input schema shows the model's fault hooks only when `faults` (fault_injection) is on."""
    pipe = redis.pipeline(transaction=False)
    for stream in keys.streams(spec.name):
        pipe.xlen(stream)
    pipe.get(keys.batcher_state(spec.name))
    pipe.lrange(keys.scale_history(spec.name), 0, 9)
    *lens, state_raw, history = await pipe.execute()
    workers = await live_workers(redis, spec.name)
    launchers = await model_launchers(redis, spec.name)
    state: dict[str, Any] = json.loads(state_raw) if state_raw else {}
    o = spec.options
    return {
        "name": spec.name,
        "class": spec.class_path,
        "input_schema": public_schema(spec.input_schema(), spec.cls.Input, faults),
        "output_schema": spec.output_schema(),
        "batching": {"max_batch_size": o.max_batch_size, "max_latency_ms": o.max_latency_ms,
                     "on_overload": o.on_overload, "predict_concurrency": o.predict_concurrency,
                     "batch_timeout_s": o.batch_timeout_s, "max_queue": o.max_queue,
                     "max_queue_per_key": o.max_queue_per_key},
        "scaling": {"concurrency_target": o.concurrency_target, "min_workers": o.min_workers,
                    "max_workers": o.max_workers, "scale_down_delay_s": o.scale_down_delay_s},
        "workers": [{k: w.get(k) for k in ("name", "index", "device", "device_uuid", "host",
                                           "state", "lanes", "busy")}
                    for w in workers],
        # Each autoscaler's launcher: "ok", "backoff" (its workers crash; restarting with
        # backoff) or "failed" (given up after repeated start failures), with the last error.
        "launcher": sorted(launchers, key=lambda e: str(e.get("autoscaler"))),
        "queue_depth": int(sum(lens)),
        "a": state.get("a_s"),
        "b": state.get("b_s"),
        "warning": state.get("warning"),
        "batcher": state,
        "autoscaler": [json.loads(h) for h in history],
    }
