"""On a CPU slot only the model's thread is pinned to the slot's core: load and predict run
there, the rest of the worker process keeps every core."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel

from shared.devices import device_for, parse_devices
from shared.model import InferenceModel, ModelContext
from shared.modelspec import ModelSpec
from shared.redisserver import RedisServer
from shared.store import JobStore
from workers.process import compute_cores, pin_thread
from workers.runtime import BatchReport, ModelRuntime


class Item(BaseModel):
    x: int


class AffinityModel(InferenceModel):
    """Records the CPU affinity of the thread that loads it and of the one that predicts."""

    Input = Item
    Output = Item
    seen: ClassVar[dict[str, set[int]]] = {}

    def load(self, device: str) -> None:
        AffinityModel.seen["load"] = os.sched_getaffinity(0)

    def predict(self, batch: list[Any]) -> list[Any]:
        AffinityModel.seen["predict"] = os.sched_getaffinity(0)
        return batch


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux affinity and two cores")
async def test_load_and_predict_run_on_the_slot_core_and_nothing_else_is_pinned(
        redis_server: RedisServer) -> None:
    everything = os.sched_getaffinity(0)
    cores = compute_cores(device_for(parse_devices("cpu:2"), 2))
    assert cores is not None and len(cores) == 1 and cores <= everything
    spec = ModelSpec.model_validate({"name": "aff", "class": f"{__name__}:AffinityModel",
                                     "options": AffinityModel.options.model_dump()})
    redis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    runtime = ModelRuntime(spec, ModelContext(model="aff", worker_index=2, device="cpu",
                                              worker_name="aff-2"),
                           JobStore(redis, result_ttl_s=60, job_ttl_s=60), consumer="w:aff-2",
                           compute_thread_init=lambda: pin_thread(cores))
    try:
        runtime.load()
        out = await runtime._predict([Item(x=1)], BatchReport("b", 1))
        assert out == [Item(x=1)]
        assert AffinityModel.seen == {"load": cores, "predict": cores}
        assert os.sched_getaffinity(0) == everything  # the calling thread was left alone
    finally:
        await redis.aclose()


def test_a_gpu_worker_is_not_pinned() -> None:
    assert compute_cores(device_for(parse_devices("cuda:0"), 1)) is None
