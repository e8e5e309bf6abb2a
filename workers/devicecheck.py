"""A worker's check that it got the device its launcher gave it, before it loads the model.

A GPU worker whose torch cannot see CUDA (a CPU build of torch, a missing driver, a
CUDA_VISIBLE_DEVICES that names nothing) must not quietly run on the CPU: it stops with an
error that says what it expected and what it found, and its launcher's backoff reports it.
"""

from __future__ import annotations

import os
from typing import Any

from shared.devices import Device
from shared.errors import ConfigError


def cuda_uuid(props: Any) -> str:
    """torch's device UUID in nvidia-smi's spelling (GPU-...); '' when torch has none."""
    raw = str(getattr(props, "uuid", "") or "")
    if not raw or raw.startswith(("GPU-", "MIG-")):
        return raw
    return f"GPU-{raw}"


def verify(device: Device) -> str:
    """Nothing for a CPU slot; for a GPU, import torch and confirm that cuda:0 is there.
    Returns the UUID torch reports for it. Raises ConfigError when CUDA is missing."""
    if device.kind != "cuda":
        return ""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise ConfigError(
            f"this worker was given {device.label} ({device.uuid or 'no UUID'}) but torch sees "
            f"no CUDA device: torch {torch.__version__} built for CUDA "
            f"{torch.version.cuda or 'none (a CPU build)'}, CUDA_VISIBLE_DEVICES={visible!r}. "
            "Install a CUDA build of torch, or serve this host with ASYNCINFER_DEVICES=cpu")
    if torch.cuda.device_count() != 1:
        raise ConfigError(f"this worker should see exactly its own GPU, but torch sees "
                          f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={visible!r})")
    return cuda_uuid(torch.cuda.get_device_properties(0))
