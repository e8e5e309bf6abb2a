"""NVIDIA GPUs this process may use, as `nvidia-smi` and the inherited `CUDA_VISIBLE_DEVICES`
describe them. No torch and no CUDA here: the launcher must not initialise CUDA.

- Order is the PCI bus order (what `nvidia-smi` numbers and what CUDA uses with
  `CUDA_DEVICE_ORDER=PCI_BUS_ID`, which every worker gets); CUDA's own default order
  (fastest first) can differ from it.
- A GPU in MIG mode is not usable whole: each of its MIG instances is a device.
- An inherited `CUDA_VISIBLE_DEVICES` (a scheduler's grant: `4,5,6,7`, `GPU-...`, `MIG-...`)
  limits the devices to the ones it names, read the way CUDA reads it (integers are positions
  in PCI bus order, UUIDs may be unique prefixes, the list stops at the first entry that names
  nothing).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 10.0

_GPU_LINE = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[^)\s]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)\s]+)\)")


@dataclass(frozen=True)
class Gpu:
    """One CUDA device: a whole GPU, or one MIG instance of a GPU."""

    index: int  # the physical GPU's index as nvidia-smi numbers it
    uuid: str  # GPU-... or MIG-...: what CUDA_VISIBLE_DEVICES names it by
    name: str
    pci_bus_id: str = ""
    mig: int | None = None  # the MIG device number inside its GPU
    gpu_uuid: str = ""  # the physical GPU's UUID (the same as uuid for a whole GPU)

    @property
    def physical(self) -> str:
        return self.gpu_uuid or self.uuid


def parse_list(text: str) -> list[Gpu]:
    """Whole GPUs and MIG instances from `nvidia-smi -L`. A GPU that lists MIG instances is
    replaced by them (a GPU in MIG mode runs CUDA work only inside an instance)."""
    gpus: list[Gpu] = []
    current: Gpu | None = None
    migs: dict[int, list[Gpu]] = {}
    for line in text.splitlines():
        if m := _GPU_LINE.match(line):
            current = Gpu(int(m.group(1)), m.group(3), m.group(2).strip())
            gpus.append(current)
        elif (m := _MIG_LINE.match(line)) and current is not None:
            migs.setdefault(current.index, []).append(Gpu(
                current.index, m.group(3), f"{current.name} MIG {m.group(1)}",
                mig=int(m.group(2)), gpu_uuid=current.uuid))
    out: list[Gpu] = []
    for gpu in gpus:
        out.extend(migs.get(gpu.index, [gpu]))
    return out


def parse_bus_ids(text: str) -> dict[int, str]:
    """`nvidia-smi --query-gpu=index,pci.bus_id --format=csv,noheader`: index -> bus id."""
    out: dict[int, str] = {}
    for line in text.splitlines():
        index, _, bus = (part.strip() for part in line.partition(","))
        if index.isdigit() and bus:
            out[int(index)] = bus.lower()
    return out


def in_pci_order(gpus: list[Gpu], bus_ids: Mapping[int, str]) -> list[Gpu]:
    """Sorted by PCI bus id (then MIG number); GPUs without a known bus id keep nvidia-smi's
    order after the known ones."""
    with_bus = [Gpu(g.index, g.uuid, g.name, bus_ids.get(g.index, ""), g.mig, g.gpu_uuid)
                for g in gpus]
    return sorted(with_bus, key=lambda g: (g.pci_bus_id == "", g.pci_bus_id, g.index,
                                           -1 if g.mig is None else g.mig))


def visible(gpus: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The devices an inherited CUDA_VISIBLE_DEVICES leaves, in its order; None: all of them."""
    if cuda_visible_devices is None:
        return list(gpus)
    physical = list(dict.fromkeys(g.index for g in gpus))  # `gpus` is in PCI order
    out: list[Gpu] = []
    for raw in cuda_visible_devices.split(","):
        entry = raw.strip()
        if entry.isdigit() and int(entry) < len(physical):
            found = [g for g in gpus if g.index == physical[int(entry)]]
        elif entry.startswith("GPU-"):
            found = [g for g in gpus if g.physical.startswith(entry)]
        elif entry.startswith("MIG-"):
            found = [g for g in gpus if g.uuid.startswith(entry)]
        else:
            found = []
        if not found:
            if entry:
                log.warning("CUDA_VISIBLE_DEVICES entry %r names no device here; CUDA ignores "
                            "it and every entry after it", entry)
            break
        out.extend(g for g in found if g not in out)
    return out


def _run(args: list[str]) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed args=%s error=%s", " ".join(args[1:]), exc)
        return None
    if out.returncode != 0:
        log.warning("nvidia-smi failed args=%s code=%d stderr=%s", " ".join(args[1:]),
                    out.returncode, out.stderr.strip()[:200])
        return None
    return out.stdout


def discover() -> list[Gpu]:
    """Every CUDA device of this machine in PCI bus order, before CUDA_VISIBLE_DEVICES;
    empty without a working `nvidia-smi` on PATH."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    listing = _run([smi, "-L"])
    if not listing:
        return []
    bus = _run([smi, "--query-gpu=index,pci.bus_id", "--format=csv,noheader"]) or ""
    return in_pci_order(parse_list(listing), parse_bus_ids(bus))
