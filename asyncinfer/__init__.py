"""asyncinfer: asynchronous batched inference over Redis Streams and Celery.

The public API, all importable from this package:

    from asyncinfer import InferenceModel, ServingOptions     # write a model
    from asyncinfer import worker_context                     # where a worker runs it
    from asyncinfer import Client, AsyncClient, ApiError      # call a running system

Everything else (`shared`, `gateway`, `batcher`, `workers`) is internal and may change. The
names load on first use, so `import asyncinfer` costs nothing (no HTTP client, no torch): the
gateway and the batcher import model classes that import this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute) it is implemented by.
_EXPORTS: dict[str, tuple[str, str]] = {
    "InferenceModel": ("shared.model", "InferenceModel"),
    "ServingOptions": ("shared.model", "ServingOptions"),
    "ModelContext": ("shared.model", "ModelContext"),
    "FAULT_HOOK": ("shared.model", "FAULT_HOOK"),
    "worker_context": ("workers.context", "current"),
    "Client": ("asyncinfer.client", "Client"),
    "AsyncClient": ("asyncinfer.client", "AsyncClient"),
    "ApiError": ("asyncinfer.client", "ApiError"),
    "ModelInfo": ("asyncinfer.client", "ModelInfo"),
    "SubmitOptions": ("asyncinfer.client", "SubmitOptions"),
    "Job": ("shared.jobs", "Job"),
}

__all__ = ["FAULT_HOOK", "ApiError", "AsyncClient", "Client", "InferenceModel", "Job",
           "ModelContext", "ModelInfo", "ServingOptions", "SubmitOptions", "worker_context"]

if TYPE_CHECKING:
    from asyncinfer.client import ApiError, AsyncClient, Client, ModelInfo, SubmitOptions
    from shared.jobs import Job
    from shared.model import FAULT_HOOK, InferenceModel, ModelContext, ServingOptions
    from workers.context import current as worker_context


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'asyncinfer' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
