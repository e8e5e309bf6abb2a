"""Devices a machine offers to workers, and the environment that pins a worker to one.

No torch here: the launcher and the gateway must not import it. GPUs come from `shared.gpus`
(nvidia-smi, in PCI bus order, MIG instances as devices, limited by an inherited
CUDA_VISIBLE_DEVICES). A launcher decides the device and hands it to the worker in its
environment (`pinning_env`); the worker reads it back (`from_env`) instead of looking again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from shared import gpus as gpu_discovery
from shared.errors import ConfigError

# What a launcher hands a worker (besides WORKER_INDEX and the CUDA variables).
DEVICE_ENV = "ASYNCINFER_DEVICE"
DEVICE_UUID_ENV = "ASYNCINFER_DEVICE_UUID"


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    ordinal: int  # CPU slot, or the GPU's index as nvidia-smi numbers it
    uuid: str = ""  # GPU-... or MIG-... (GPUs found by nvidia-smi)
    mig: int | None = None  # MIG device number inside the GPU `ordinal`

    @property
    def label(self) -> str:
        """How jobs, heartbeats and logs name it: cpu:1, cuda:3, cuda:0:mig2."""
        base = f"{self.kind}:{self.ordinal}"
        return base if self.mig is None else f"{base}:mig{self.mig}"

    @property
    def slug(self) -> str:
        """The label without punctuation, for names: cpu1, cuda3, cuda0mig2."""
        return self.label.replace(":", "")

    @property
    def torch_device(self) -> str:
        # The launcher hides every other GPU, so the worker's own GPU is always cuda:0.
        return "cuda:0" if self.kind == "cuda" else "cpu"

    @property
    def cuda_visible(self) -> str:
        """CUDA_VISIBLE_DEVICES for a worker on this device: the UUID when known (immune to
        ordering), else the PCI-order position."""
        if self.kind != "cuda":
            return ""
        return self.uuid or str(self.ordinal)


def host_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, within its cgroup's CPU quota (a
    container's `--cpus`, a pod's CPU limit), which the affinity does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _cpu(rest: str) -> list[Device]:
    if not rest:
        return [Device("cpu", i) for i in range(host_cores())]
    try:
        if "," in rest:
            slots = [int(x) for x in rest.split(",") if x.strip()]
        elif "-" in rest:
            first, _, last = rest.partition("-")
            slots = list(range(int(first), int(last) + 1))
        else:
            slots = list(range(int(rest)))
    except ValueError as exc:
        raise ConfigError(f"cannot parse CPU slots {rest!r}") from exc
    if not slots or min(slots) < 0 or len(set(slots)) != len(slots):
        raise ConfigError(f"CPU slots {rest!r} name no slot, a negative one or one twice")
    return [Device("cpu", i) for i in slots]


def _of(gpu: gpu_discovery.Gpu) -> Device:
    return Device("cuda", gpu.index, gpu.uuid, gpu.mig)


def _cuda(rest: str, env: Mapping[str, str], explicit: bool = True) -> list[Device]:
    inherited = env.get("CUDA_VISIBLE_DEVICES")
    found = gpu_discovery.discover()
    usable = gpu_discovery.visible(found, inherited)
    if not found and inherited and explicit:
        # No nvidia-smi (some containers): trust the grant as it is written.
        usable = [gpu_discovery.Gpu(int(e) if e.isdigit() else i, "" if e.isdigit() else e, "")
                  for i, e in enumerate(x.strip() for x in inherited.split(",") if x.strip())]
    if not rest:
        if not usable:
            raise ConfigError("devices 'cuda' asked for, but no GPU is visible (nvidia-smi "
                              f"found {len(found)}, CUDA_VISIBLE_DEVICES={inherited!r})")
        return [_of(g) for g in usable]
    out: list[Device] = []
    for raw in (x.strip() for x in rest.split(",") if x.strip()):
        if raw.isdigit():
            match = [g for g in usable if g.index == int(raw)]
            if not match and not found and inherited is None:
                match = [gpu_discovery.Gpu(int(raw), "", "")]  # no nvidia-smi: as written
        else:
            match = [g for g in usable if g.uuid.startswith(raw) or g.physical.startswith(raw)]
        if not match:
            raise ConfigError(f"GPU {raw!r} is not visible here (nvidia-smi found "
                              f"{[g.uuid for g in found]}, CUDA_VISIBLE_DEVICES={inherited!r})")
        out.extend(_of(g) for g in match if _of(g) not in out)
    return out


def parse_devices(spec: str, env: Mapping[str, str] | None = None) -> list[Device]:
    """'auto' | 'cpu' | 'cpu:N' | 'cpu:I-J' | 'cpu:I,J' | 'cuda' | 'cuda:0,1' | 'cuda:GPU-...'.

    'auto' is every visible GPU, else one CPU slot per core. 'cpu:N' is N slots (cpu:0 ..
    cpu:N-1); 'cpu:I-J' and 'cpu:I,J' name slots, so two autoscalers on one host can own
    separate ones. 'cuda:...' lists GPUs by nvidia-smi index or UUID (prefix).
    """
    env = os.environ if env is None else env
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "auto" and not rest:
        try:
            return _cuda("", env, explicit=False)
        except ConfigError:
            return _cpu("")
    if kind == "cpu":
        return _cpu(rest)
    if kind == "cuda":
        return _cuda(rest, env)
    raise ConfigError(f"cannot parse devices {spec!r}")


def device_for(devices: list[Device], worker_index: int) -> Device:
    """The device of a worker started by hand (no launcher): worker index is 1-based
    (BentoML's worker_index); indexes past the list wrap around."""
    if worker_index < 1:
        raise ConfigError("worker index starts at 1")
    return devices[(worker_index - 1) % len(devices)]


def pinning_env(device: Device, worker_index: int) -> dict[str, str]:
    """Environment a launcher sets before the worker process starts (before CUDA can init)."""
    return {"WORKER_INDEX": str(worker_index), DEVICE_ENV: device.label,
            DEVICE_UUID_ENV: device.uuid, "CUDA_VISIBLE_DEVICES": device.cuda_visible,
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def from_env(env: Mapping[str, str]) -> Device | None:
    """The device a launcher handed this process, or None when started without one."""
    label = env.get(DEVICE_ENV, "").strip()
    if not label:
        return None
    parts = label.split(":")
    try:
        kind, ordinal = parts[0], int(parts[1])
        mig = int(parts[2].removeprefix("mig")) if len(parts) > 2 else None
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"{DEVICE_ENV}={label!r} is no device label") from exc
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"{DEVICE_ENV}={label!r} is no device label")
    return Device(kind, ordinal, env.get(DEVICE_UUID_ENV, ""), mig)
