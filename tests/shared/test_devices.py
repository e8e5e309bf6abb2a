"""GPU discovery against a fake `nvidia-smi` on PATH (a seam we own), and the environment that
carries a device from the launcher to its worker."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shared.devices import (
    Device,
    device_for,
    from_env,
    host_cores,
    parse_devices,
    pinning_env,
)
from shared.errors import ConfigError

# nvidia-smi numbers GPUs by NVML index; here index 1 sits first on the PCI bus, so PCI order
# (what CUDA uses with CUDA_DEVICE_ORDER=PCI_BUS_ID) is 1, 0, 2, 3.
FOUR = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa0000-0000-0000-0000-000000000000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb1111-0000-0000-0000-000000000000)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-cccc2222-0000-0000-0000-000000000000)
GPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-dddd3333-0000-0000-0000-000000000000)
"""
FOUR_BUS = """0, 00000000:3B:00.0
1, 00000000:18:00.0
2, 00000000:86:00.0
3, 00000000:AF:00.0
"""
MIG = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-e91edf3b-b297-37c1-a2a7-7601c3238fa2)
  MIG 3g.20gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)
  MIG 3g.20gb     Device  1: (UUID: MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0f1e2d3c-0000-0000-0000-000000000000)
"""
MIG_BUS = "0, 00000000:07:00.0\n1, 00000000:0F:00.0\n"


def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listing: str, bus: str = "",
             code: int = 0) -> None:
    """Put an `nvidia-smi` first on PATH that prints `listing` for -L, `bus` for the query."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "list.txt").write_text(listing)
    (bindir / "bus.txt").write_text(bus)
    script = bindir / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
here=$(dirname "$0")
[ {code} -eq 0 ] || {{ echo "NVIDIA-SMI has failed" >&2; exit {code}; }}
case "$1" in
  -L) cat "$here/list.txt" ;;
  --query-gpu=*) cat "$here/bus.txt" ;;
  *) exit 2 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}/usr/bin:/bin")


def labels(devices: list[Device]) -> list[str]:
    return [d.label for d in devices]


def test_gpus_come_in_pci_bus_order_with_their_uuids(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(tmp_path, monkeypatch, FOUR, FOUR_BUS)
    devices = parse_devices("auto", env={})
    assert labels(devices) == ["cuda:1", "cuda:0", "cuda:2", "cuda:3"]
    assert devices[0].uuid == "GPU-bbbb1111-0000-0000-0000-000000000000"
    assert parse_devices("cuda", env={}) == devices


def test_an_inherited_cuda_visible_devices_is_honoured(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(tmp_path, monkeypatch, FOUR, FOUR_BUS)
    # Positions in PCI order: 2 and 3 are the GPUs nvidia-smi calls 2 and 3; 0 is GPU 1.
    assert labels(parse_devices("auto", env={"CUDA_VISIBLE_DEVICES": "2,3"})) == [
        "cuda:2", "cuda:3"]
    assert labels(parse_devices("cuda", env={"CUDA_VISIBLE_DEVICES": "0"})) == ["cuda:1"]
    # UUIDs, also as unique prefixes, in the grant's order.
    assert labels(parse_devices("cuda", env={
        "CUDA_VISIBLE_DEVICES": "GPU-dddd3333,GPU-aaaa0000-0000-0000-0000-000000000000"})) == [
        "cuda:3", "cuda:0"]
    # CUDA stops at the first entry that names nothing: never more devices than granted.
    assert labels(parse_devices("cuda", env={"CUDA_VISIBLE_DEVICES": "3,bogus,0"})) == [
        "cuda:3"]
    # An explicit list must stay inside the grant.
    with pytest.raises(ConfigError, match="not visible"):
        parse_devices("cuda:0", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert labels(parse_devices("cuda:3,2", env={"CUDA_VISIBLE_DEVICES": "2,3"})) == [
        "cuda:3", "cuda:2"]


def test_an_empty_grant_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(tmp_path, monkeypatch, FOUR, FOUR_BUS)
    assert {d.kind for d in parse_devices("auto", env={"CUDA_VISIBLE_DEVICES": ""})} == {"cpu"}
    with pytest.raises(ConfigError, match="no GPU is visible"):
        parse_devices("cuda", env={"CUDA_VISIBLE_DEVICES": ""})


def test_mig_instances_are_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(tmp_path, monkeypatch, MIG, MIG_BUS)
    devices = parse_devices("auto", env={})
    assert labels(devices) == ["cuda:0:mig0", "cuda:0:mig1", "cuda:1"]
    assert devices[1].uuid == "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"
    env = pinning_env(devices[1], 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb"
    assert from_env(env) == devices[1]
    assert devices[1].slug == "cuda0mig1"
    # Granting the GPU grants its instances; granting one instance grants only that one.
    assert labels(parse_devices("cuda", env={"CUDA_VISIBLE_DEVICES": "GPU-e91edf3b"})) == [
        "cuda:0:mig0", "cuda:0:mig1"]
    assert labels(parse_devices("cuda", env={"CUDA_VISIBLE_DEVICES": "MIG-c6d4"})) == [
        "cuda:0:mig0"]


def test_without_a_working_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(tmp_path, monkeypatch, "", code=9)  # installed, but no driver
    assert {d.kind for d in parse_devices("auto", env={})} == {"cpu"}
    with pytest.raises(ConfigError):
        parse_devices("cuda", env={})
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # none at all (a container without the tools)
    assert {d.kind for d in parse_devices("auto", env={"CUDA_VISIBLE_DEVICES": "0"})} == {"cpu"}
    # Asked for by name, GPUs are taken as written: the grant, or the ordinals.
    assert labels(parse_devices("cuda", env={"CUDA_VISIBLE_DEVICES": "4,5"})) == [
        "cuda:4", "cuda:5"]
    assert labels(parse_devices("cuda:0,1", env={})) == ["cuda:0", "cuda:1"]
    assert pinning_env(Device("cuda", 4), 1)["CUDA_VISIBLE_DEVICES"] == "4"


def test_cpu_slots() -> None:
    assert labels(parse_devices("cpu:2")) == ["cpu:0", "cpu:1"]
    assert labels(parse_devices("cpu:2-3")) == ["cpu:2", "cpu:3"]
    assert labels(parse_devices("cpu:5,1")) == ["cpu:5", "cpu:1"]
    assert len(parse_devices("cpu")) == host_cores()  # the affinity, within a CPU quota
    for bad in ("cpu:0", "cpu:x", "cpu:1,1", "tpu:1", "cpu:3-1"):
        with pytest.raises(ConfigError):
            parse_devices(bad)
    assert device_for(parse_devices("cpu:2"), 3).label == "cpu:0"  # by hand: wraps around


def test_the_worker_reads_its_device_from_the_launcher() -> None:
    cpu = Device("cpu", 1)
    env = pinning_env(cpu, 2)
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU worker sees no GPU at all
    assert env["WORKER_INDEX"] == "2" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert from_env(env) == cpu
    gpu = Device("cuda", 3, "GPU-dddd3333-0000-0000-0000-000000000000")
    assert from_env(pinning_env(gpu, 1)) == gpu
    assert from_env({}) is None
    with pytest.raises(ConfigError):
        from_env({"ASYNCINFER_DEVICE": "gpu:one"})


def test_a_cpu_quota_caps_the_cores_counted(tmp_path: Path) -> None:
    # A container's --cpus=1.5 (cgroup v2 cpu.max): two cores' worth of slots and gateway
    # processes at most, whatever the affinity shows.
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert host_cores(cpu_max) == min(2, len(os.sched_getaffinity(0)))
    cpu_max.write_text("max 100000\n")
    assert host_cores(cpu_max) == len(os.sched_getaffinity(0))
    assert host_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))
