"""Devices a machine offers to workers, and the environment that pins a worker to one.

No torch here: the launcher and the gateway must not import it. GPUs are counted with
`nvidia-smi -L` when it exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from shared.errors import ConfigError


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    ordinal: int

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.ordinal}"

    @property
    def torch_device(self) -> str:
        # The launcher hides every other GPU, so the worker's own GPU is always cuda:0.
        return "cuda:0" if self.kind == "cuda" else "cpu"


def _gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def parse_devices(spec: str) -> list[Device]:
    """'auto' | 'cpu' | 'cpu:N' | 'cuda' | 'cuda:0,1'."""
    spec = spec.strip().lower()
    if spec == "auto":
        gpus = _gpu_count()
        return parse_devices("cuda" if gpus else "cpu")
    kind, _, rest = spec.partition(":")
    if kind == "cpu":
        n = int(rest) if rest else (os.cpu_count() or 1)
        return [Device("cpu", i) for i in range(n)]
    if kind == "cuda":
        ordinals = [int(x) for x in rest.split(",") if x] if rest else list(range(_gpu_count()))
        if not ordinals:
            raise ConfigError("devices 'cuda' asked for, but no GPU was found")
        return [Device("cuda", i) for i in ordinals]
    raise ConfigError(f"cannot parse devices {spec!r}")


def device_for(devices: list[Device], worker_index: int) -> Device:
    """Worker index is 1-based (BentoML's worker_index); indexes past the list wrap around."""
    if worker_index < 1:
        raise ConfigError("worker index starts at 1")
    return devices[(worker_index - 1) % len(devices)]


def pinning_env(device: Device, worker_index: int) -> dict[str, str]:
    """Environment a launcher sets before the worker process starts (before CUDA can init)."""
    env = {"WORKER_INDEX": str(worker_index), "ASYNCINFER_DEVICE": device.label}
    env["CUDA_VISIBLE_DEVICES"] = str(device.ordinal) if device.kind == "cuda" else ""
    return env
