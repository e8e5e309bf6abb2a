"""The model plug-in interface: what a user writes to serve a PyTorch (or any) model.

Keep heavy imports (torch, weights) inside `load`: the gateway and batcher import the class only
to read its schemas and options, and they must never import torch.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field

# Marks an Input field as a fault hook (`Field(..., json_schema_extra=FAULT_HOOK)`): a way to
# make a worker fail, hang or die on purpose. The gateway refuses a request that sets one (422)
# and leaves it out of the published schemas unless `fault_injection` is on.
FAULT_HOOK: dict[str, Any] = {"fault_hook": True}


@functools.cache
def fault_hooks(input_cls: type[BaseModel]) -> frozenset[str]:
    """Names of the fields of `input_cls` marked FAULT_HOOK."""
    return frozenset(
        name for name, f in input_cls.model_fields.items()
        if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("fault_hook"))


class ServingOptions(BaseModel):
    """How one model is batched, run and scaled. Overridable per model in the configuration."""

    max_batch_size: int = Field(32, ge=1)
    max_latency_ms: float = Field(200.0, gt=0)
    on_overload: Literal["queue", "shed"] = "queue"
    predict_concurrency: int = Field(1, ge=1)
    concurrency_target: int = Field(64, ge=1, description="Requests one worker should hold.")
    min_workers: int = Field(0, ge=0)
    max_workers: int | None = Field(
        None, ge=1, description="None: as many as the devices allow (workers_per_device each).")
    workers_per_device: int = Field(
        1, ge=1, description="Workers of this model one device may hold; more than 1 shares a "
        "device between them (a small model on a big GPU).")
    scale_down_delay_s: float = Field(30.0, ge=0)
    max_queue: int = Field(100_000, ge=1)
    max_queue_per_key: int | None = Field(
        None, ge=1, description="Most jobs one API key may have queued for this model (with "
        "API keys on); None: half of max_queue.")
    batch_timeout_s: float = Field(60.0, gt=0, description="Time limit of one batch.")


class ModelContext(BaseModel):
    """Where a model instance runs; user code reads it as BentoML users read server_context."""

    model: str
    worker_index: int
    device: str  # what load() receives: "cpu" or "cuda:0"
    worker_name: str
    device_label: str = ""  # which device of the host: "cpu:1", "cuda:3"
    device_uuid: str = ""  # GPU-... or MIG-... on a GPU


class InferenceModel:
    """Base class of served models.

    Subclasses set `Input` and `Output` (pydantic models), implement `predict(batch)` and may
    override `load`, `preprocess` and `postprocess`. Raising from `preprocess`/`postprocess`
    fails that item's job only; an item of `predict`'s result that is an Exception fails that job
    only; raising from `predict` makes the worker bisect the batch to find the bad item.
    """

    Input: ClassVar[type[BaseModel]]
    Output: ClassVar[type[BaseModel]]
    options: ClassVar[ServingOptions] = ServingOptions()

    def __init__(self, **params: Any) -> None:
        self.params = params

    def load(self, device: str) -> None:
        """Load weights onto `device` ('cpu' or 'cuda:0'); called once per worker process."""

    def preprocess(self, item: Any) -> Any:
        """Per item, before batching; receives the validated Input instance."""
        return item

    def predict(self, batch: list[Any]) -> list[Any]:
        """The whole batch at once; returns one result per item, in order."""
        raise NotImplementedError

    def postprocess(self, result: Any) -> Any:
        """Per item, after predict; returns an Output instance or a dict that validates as one."""
        return result
