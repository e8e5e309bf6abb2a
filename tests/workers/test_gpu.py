"""Workers on a GPU through real processes: two mlp workers pinned the way the launcher pins
them, outputs checked against the same network on CPU, and a two-worker throughput run.

Skipped unless torch sees a CUDA device. With one GPU both worker indexes map to it (device
indexes wrap around), so the two workers share cuda:0; with two or more each gets its own, and
either way each process sees its GPU as cuda:0 through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import httpx
import pytest
import redis
import torch

from shared import keys
from shared.devices import device_for, parse_devices, pinning_env
from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready
from workers.builtin.mlp import IN_FEATURES, build_mlp

# Ask NVML, not the CUDA driver: this process forks (to start the workers) after the check.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DEVICES = "cuda"
THROUGHPUT_JOBS = 2000
CHUNK = 100  # inputs per jobs:batch request, well under the gateway's body limit
# The logits are small (|y| about 0.01, at most about 0.05) and a wrong network is off by that
# much. GPU and CPU float32 kernels sum in different orders (about 1e-7 apart); even TF32
# matmuls, were they switched on, stay near 1e-4.
ATOL = 5e-4
RTOL = 1e-3


def _start_gpu_worker(procs: Procs, index: int) -> None:
    """Start an mlp worker exactly as the local launcher would on this machine."""
    device = device_for(parse_devices(DEVICES), index)
    env = {**pinning_env(device, index), "ASYNCINFER_DEVICES": DEVICES}
    procs.start(f"worker-mlp-{index}", "workers", "--model", "mlp", "--index", str(index),
                **env)


def _inputs(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    # Three decimals keep a job's body small; the reference run uses the same rounded values.
    return [{"features": [round(rng.uniform(-1, 1), 3) for _ in range(IN_FEATURES)]}
            for _ in range(n)]


def _submit(client: httpx.Client, inputs: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(inputs), CHUNK):
        r = client.post("/v1/models/mlp/jobs:batch",
                        json={"inputs": inputs[start:start + CHUNK]})
        assert r.status_code == 202, r.text
        ids += [j["id"] for j in r.json()["jobs"]]
    return ids


def _final(client: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    return [client.get(f"/v1/jobs/{i}", params={"wait": 60}, timeout=70).json() for i in ids]


def _succeeded(r: redis.Redis) -> int:
    return int(r.hget(keys.stats("mlp"), "succeeded") or 0)


def test_two_cuda_workers_match_cpu_and_report_throughput(procs: Procs,
                                                           settings: Settings) -> None:
    procs.batcher()
    _start_gpu_worker(procs, 1)
    _start_gpu_worker(procs, 2)
    url = procs.gateway()
    wait_until(workers_ready(settings, "mlp", 2), 180, "two cuda workers ready")
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    beats = sorted((json.loads(v) for v in r.hgetall(keys.workers("mlp")).values()),
                   key=lambda b: b["index"])
    assert [b["index"] for b in beats] == [1, 2]
    assert all(b["device"].startswith("cuda:") for b in beats), beats
    n_gpus = len(parse_devices(DEVICES))
    expected = [device_for(parse_devices(DEVICES), i).label for i in (1, 2)]
    assert [b["device"] for b in beats] == expected
    if n_gpus == 1:
        assert expected == ["cuda:0", "cuda:0"]  # the wrap-around shares the one GPU

    with httpx.Client(base_url=url, timeout=30) as client:
        # Correctness: the same fixed-seed network on CPU is the reference.
        inputs = _inputs(256, seed=1)
        done = _final(client, _submit(client, inputs))
        assert [d["status"] for d in done] == ["succeeded"] * len(inputs)
        assert {d["metrics"]["device"] for d in done} == {"cuda:0"}
        net = build_mlp("cpu")
        with torch.inference_mode():
            want = net(torch.tensor([x["features"] for x in inputs], dtype=torch.float32))
        got = torch.tensor([d["output"]["logits"] for d in done], dtype=torch.float32)
        worst = float((got - want).abs().max())
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max |gpu-cpu| = {worst}"

        # Throughput: submit everything, then count finals in Redis (no per-job polling load
        # on the gateway while the clock runs).
        before = _succeeded(r)
        inputs = _inputs(THROUGHPUT_JOBS, seed=2)
        t0 = time.monotonic()
        ids = _submit(client, inputs)
        submitted_s = time.monotonic() - t0
        wait_until(lambda: _succeeded(r) - before >= THROUGHPUT_JOBS, 300,
                   f"{THROUGHPUT_JOBS} jobs succeeded")
        elapsed = time.monotonic() - t0
        done = _final(client, ids)
    assert [d["status"] for d in done] == ["succeeded"] * THROUGHPUT_JOBS
    assert {d["metrics"]["device"] for d in done} == {"cuda:0"}
    used = {d["metrics"]["worker"].split("@")[0] for d in done}
    assert used == {"mlp-1", "mlp-2"}, f"only {used} served the run"
    sizes = [d["metrics"]["batch_size"] for d in done]
    print(f"gpu: {n_gpus} GPU(s), 2 mlp workers, {THROUGHPUT_JOBS} jobs in {elapsed:.2f} s "
          f"= {THROUGHPUT_JOBS / elapsed:.0f} jobs/s (submit {submitted_s:.2f} s, "
          f"mean batch {sum(sizes) / len(sizes):.1f}), max |gpu-cpu| logit = {worst:.2e}")
