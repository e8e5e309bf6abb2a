"""Device allocation across models on one host: a pure decision, checked exhaustively."""

from __future__ import annotations

import itertools
import os

from shared.devices import Device
from workers.allocation import Placement, pick, room
from workers.launcher import torch_threads_per_worker

DEVICES = [Device("cuda", i, f"GPU-{i}") for i in range(4)]


def place(model: str, placed: list[Placement], per_device: int = 1) -> Device | None:
    device = pick(DEVICES, placed, model, per_device)
    if device is not None:
        placed.append(Placement(model, device))
    return device


def test_models_fill_every_device_before_any_is_shared() -> None:
    placed: list[Placement] = []
    # Two models' first workers (the bug: both landed on device 0).
    assert place("mlp", placed) == DEVICES[0]
    assert place("synthetic", placed) == DEVICES[1]
    assert place("mlp", placed) == DEVICES[2]
    assert place("embed", placed) == DEVICES[3]
    # Every device holds one: a further model shares the least loaded device without a
    # worker of its own there.
    assert place("synthetic", placed) == DEVICES[0]
    # mlp is on 0 and 2 and may not double up: it gets 1 or 3, never 0 or 2.
    assert place("mlp", placed) in (DEVICES[1], DEVICES[3])


def test_never_two_workers_on_a_device_while_another_is_free() -> None:
    for order in itertools.product(["a", "b", "c"], repeat=4):
        placed: list[Placement] = []
        for model in order:
            place(model, placed)
        used = [p.device for p in placed]
        if len(placed) <= len(DEVICES):
            assert len(set(used)) == len(used), order


def test_a_model_never_shares_a_device_with_itself_unless_it_asks() -> None:
    placed: list[Placement] = []
    for _ in range(4):
        assert place("m", placed) is not None
    assert place("m", placed) is None and room(DEVICES, placed, "m", 1) == 0
    assert room(DEVICES, placed, "m", 2) == 4
    assert place("m", placed, per_device=2) == DEVICES[0]


def test_scale_down_frees_the_device_for_another_model() -> None:
    placed: list[Placement] = []
    for model in ("a", "a", "a", "a"):
        place(model, placed)
    placed.remove(Placement("a", DEVICES[2]))  # a worker of a drained
    assert place("b", placed) == DEVICES[2]


def test_torch_threads_split_the_host_cores_between_gpu_workers() -> None:
    cores = len(os.sched_getaffinity(0))
    assert torch_threads_per_worker(DEVICES[:1]) == cores
    assert torch_threads_per_worker(DEVICES) == max(1, cores // 4)
    assert torch_threads_per_worker([Device("cpu", 0), Device("cpu", 1)]) == 1
