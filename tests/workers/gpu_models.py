"""A model for the GPU tests: it reports where its tensors live (the torch device and that
device's UUID) and can make each batch cost a fixed amount of GPU work."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from shared.model import InferenceModel, ServingOptions
from workers.devicecheck import cuda_uuid


class ProbeInput(BaseModel):
    x: float = 1.0


class ProbeOutput(BaseModel):
    y: float
    device: str = Field(description="torch device of the model's weights")
    uuid: str = Field(description="UUID of that device as torch reports it ('' on CPU)")


class Probe(InferenceModel):
    Input = ProbeInput
    Output = ProbeOutput
    options = ServingOptions(max_batch_size=8, max_latency_ms=20, concurrency_target=8,
                             batch_timeout_s=30)

    def __init__(self, matmuls: int = 0, size: int = 4096, **params: Any) -> None:
        super().__init__(**params)
        self.matmuls = matmuls
        self.size = size

    def load(self, device: str) -> None:
        import torch  # only in the worker: the gateway imports this class for its schemas

        self.torch = torch
        torch.backends.cuda.matmul.allow_tf32 = False
        self.weights = torch.full((self.size, self.size), 1.0 / self.size, device=device)
        self.uuid = (cuda_uuid(torch.cuda.get_device_properties(self.weights.device))
                     if self.weights.is_cuda else "")

    def predict(self, batch: list[ProbeInput]) -> list[Any]:
        torch = self.torch
        x = torch.tensor([item.x for item in batch], device=self.weights.device)
        m = self.weights
        for _ in range(self.matmuls):  # a fixed GPU cost per batch, whatever its size
            m = m @ self.weights
        ys = (x * m[0, 0] * self.size).tolist()  # waits for the GPU
        return [ProbeOutput(y=y, device=str(self.weights.device), uuid=self.uuid) for y in ys]
