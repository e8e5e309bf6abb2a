"""A synthetic model whose batch of n items costs a·n + b seconds (sleep, so it releases the GIL).

The `fail` field of an item makes that item misbehave on purpose, so tests can drive every
failure path through the real system: an exception in one stage, a predict that raises for any
batch containing the item, a worker process killed mid-batch, or a predict that hangs. It and the
extra sleeps are fault hooks: the gateway accepts them only with `fault_injection` on. The
`fail_load` parameter makes every worker of the model die in load() (a crash loop).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from asyncinfer import FAULT_HOOK, InferenceModel, ServingOptions


class SyntheticInput(BaseModel):
    x: float = Field(description="Any number; the output is 2·x.")
    fail: Literal["preprocess", "predict", "postprocess", "kill", "hang"] | None = Field(
        None, json_schema_extra=FAULT_HOOK, description="Misbehave on purpose (fault hook).")
    sleep_s: float = Field(0.0, ge=0, le=60, json_schema_extra=FAULT_HOOK,
                           description="Extra predict time for this item (fault hook).")
    pre_sleep_s: float = Field(0.0, ge=0, le=60, json_schema_extra=FAULT_HOOK,
                               description="Preprocess time for this item (fault hook).")


class SyntheticOutput(BaseModel):
    y: float


class SyntheticModel(InferenceModel):
    Input = SyntheticInput
    Output = SyntheticOutput
    options = ServingOptions(max_batch_size=32, max_latency_ms=200, concurrency_target=64,
                             batch_timeout_s=30)

    def __init__(self, a_s: float = 0.002, b_s: float = 0.010, fail_load: bool = False,
                 **params: Any) -> None:
        super().__init__(**params)
        self.a_s = a_s
        self.b_s = b_s
        self.fail_load = fail_load

    def load(self, device: str) -> None:
        if self.fail_load:
            # A model whose weights are missing: its workers die before they serve.
            raise RuntimeError("synthetic load failure (params.fail_load)")

    def preprocess(self, item: SyntheticInput) -> SyntheticInput:
        if item.fail == "preprocess":
            raise ValueError("synthetic preprocess failure")
        time.sleep(item.pre_sleep_s)
        return item

    def predict(self, batch: list[SyntheticInput]) -> list[Any]:
        for item in batch:
            if item.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if item.fail == "predict":
                raise RuntimeError("synthetic predict failure")
        hang = any(item.fail == "hang" for item in batch)
        time.sleep(self.a_s * len(batch) + self.b_s + max(i.sleep_s for i in batch)
                   + (3600.0 if hang else 0.0))
        return [item for item in batch]

    def postprocess(self, item: SyntheticInput) -> SyntheticOutput:
        if item.fail == "postprocess":
            raise ValueError("synthetic postprocess failure")
        return SyntheticOutput(y=2 * item.x)
