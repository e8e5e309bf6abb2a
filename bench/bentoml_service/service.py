"""The peer: BentoML serving the same torch MLP (same fixed-seed weights, via build_mlp) with its
adaptive batching, `max_batch_size=64` and `max_latency_ms=250` like our `mlp` model.

Runs in its own virtual environment (bench/results/.venv-bentoml, made by `bench.bento`), from
this folder, with the repository root on PYTHONPATH so that `workers.builtin.mlp` imports (it
needs only pydantic and torch):

    bentoml serve service:MLPService --host 127.0.0.1 --port 3000

BENCH_BENTO_WORKERS sets the worker processes (default 1), BENCH_TORCH_THREADS torch's threads
in each (default 1, like one asyncinfer CPU worker).
"""

# mypy: ignore-errors
# (bentoml and numpy live only in the benchmark's own environment, not in the project's.)

from __future__ import annotations

import os

import bentoml
import numpy as np

WORKERS = int(os.environ.get("BENCH_BENTO_WORKERS", "1"))
THREADS = int(os.environ.get("BENCH_TORCH_THREADS", "1"))


@bentoml.service(workers=WORKERS, threads=1, traffic={"timeout": 120})
class MLPService:
    def __init__(self) -> None:
        import torch

        from workers.builtin.mlp import build_mlp

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.device = os.environ.get("BENCH_DEVICE", "cpu")
        self.net = build_mlp(self.device)

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=250)
    def predict(self, features: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(self.device)
            return self.net(x).float().cpu().numpy()
