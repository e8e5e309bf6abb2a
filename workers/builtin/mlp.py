"""A real torch model that needs no download: an MLP with fixed-seed weights.

Its weights (about 9 M parameters, 36 MB) do not fit in cache, so a batch of one is bound by
reading them from memory while a batch of 64 reuses each weight 64 times: batching pays a lot.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, Field

from asyncinfer import InferenceModel, ServingOptions

IN_FEATURES = 256
HIDDEN = 2048
CLASSES = 16
SEED = 0


class MLPInput(BaseModel):
    features: list[float] = Field(min_length=IN_FEATURES, max_length=IN_FEATURES)


class MLPOutput(BaseModel):
    logits: list[float]
    label: int


def build_mlp(device: str = "cpu") -> Any:
    """The network with its fixed weights; the same call gives the same model anywhere."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    layers: list[Any] = []
    dims = [IN_FEATURES, HIDDEN, HIDDEN, HIDDEN, CLASSES]
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        linear = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            bound = fan_in ** -0.5
            linear.weight.copy_(torch.rand(fan_out, fan_in, generator=gen) * 2 * bound - bound)
            linear.bias.copy_(torch.rand(fan_out, generator=gen) * 2 * bound - bound)
        layers.append(linear)
        if i < len(dims) - 2:
            layers.append(torch.nn.GELU())
    return torch.nn.Sequential(*layers).eval().to(device)


class MLPModel(InferenceModel):
    Input = MLPInput
    Output = MLPOutput
    options = ServingOptions(max_batch_size=64, max_latency_ms=250, concurrency_target=128,
                             batch_timeout_s=60)

    def load(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.net = build_mlp(device)

    def predict(self, batch: list[MLPInput]) -> list[list[float]]:
        torch = self.torch
        with torch.inference_mode():
            x = torch.tensor([item.features for item in batch], dtype=torch.float32,
                             device=self.device)
            out: list[list[float]] = self.net(x).float().cpu().tolist()
        return out

    def postprocess(self, logits: list[float]) -> MLPOutput:
        return MLPOutput(logits=logits, label=max(range(len(logits)), key=logits.__getitem__))
