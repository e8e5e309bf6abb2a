"""Workers on GPUs through real processes, started the way users run them: the autoscaler's
local launcher (`python -m workers.autoscaler`, as `asyncinfer up` and the compose service run
it) with ASYNCINFER_DEVICES=cuda, so discovery (nvidia-smi, PCI order, UUIDs), allocation and
pinning are the production ones.

Each test skips unless torch sees CUDA; the ones that need two GPUs skip on a one-GPU machine
and say so. `bash bench/gpu_check.sh` runs them (with `-m gpu`) and writes docs/gpu.md.
Measured figures are also appended as JSON lines to $GPU_CHECK_RESULTS when it is set.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch

from shared import keys
from shared.devices import Device, parse_devices
from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready
from workers.builtin.mlp import IN_FEATURES, build_mlp

# Ask NVML, not the CUDA driver, whether there is a GPU: this process starts the workers.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

PROBE = "tests.workers.gpu_models:Probe"
READY_S = 240  # a first CUDA start-up (torch import, context, weights) can be slow
# The logits are small (|y| about 0.01, at most about 0.05) and a wrong network is off by that
# much. GPU and CPU float32 kernels sum in different orders (about 1e-7 apart); even TF32
# matmuls, were they switched on, stay near 1e-4.
ATOL = 5e-4
RTOL = 1e-3
# A jobs:batch request's body stays under half the test gateway's body limit (64 KiB, from
# tests/conftest.py): 100 MLP inputs of 256 features are about 160 KB.
REQUEST_BYTES = 32 * 1024


@pytest.fixture(scope="module")
def gpus() -> list[Device]:
    """The CUDA devices the launcher will use, as it finds them (nvidia-smi, PCI order)."""
    return parse_devices("cuda")


def _record(name: str, **figures: Any) -> None:
    out = os.environ.get("GPU_CHECK_RESULTS")
    print(f"gpu[{name}]: {json.dumps(figures)}")
    if out:
        with Path(out).open("a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def _need_two(gpus: list[Device]) -> None:
    if len(gpus) < 2:
        pytest.skip(f"needs two CUDA devices; this machine has {len(gpus)} "
                    f"({', '.join(d.label for d in gpus)})")


def _models(tmp_path: Path, **tables: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text("\n".join(f"[models.{name}]\n{body}\n" for name, body in tables.items()))
    return str(path)


def _probe(min_workers: int, max_workers: int, matmuls: int = 0) -> str:
    return (f'class = "{PROBE}"\nparams = {{ matmuls = {matmuls} }}\n'
            f"min_workers = {min_workers}\nmax_workers = {max_workers}\n")


def _stack(procs: Procs, models: str, devices: str = "cuda", name: str = "") -> str:
    procs.start(f"batcher{name}", "batcher", ASYNCINFER_MODELS=models)
    procs.autoscaler(f"autoscaler{name}", ASYNCINFER_MODELS=models, ASYNCINFER_DEVICES=devices)
    return procs.gateway(ASYNCINFER_MODELS=models)


def _beats(settings: Settings, model: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    return sorted((json.loads(v) for v in r.hgetall(keys.workers(model)).values()),
                  key=lambda b: b["name"])


def _chunks(inputs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[]]
    size = 0
    for item in inputs:
        n = len(json.dumps(item)) + 2
        if out[-1] and size + n > REQUEST_BYTES:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def _run(url: str, model: str, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids: list[str] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for chunk in _chunks(inputs):
            r = client.post(f"/v1/models/{model}/jobs:batch", json={"inputs": chunk})
            assert r.status_code == 202, r.text
            ids += [j["id"] for j in r.json()["jobs"]]
        done = [client.get(f"/v1/jobs/{i}", params={"wait": 60}, timeout=70).json()
                for i in ids]
    assert [d["status"] for d in done] == ["succeeded"] * len(ids), done[0]
    return done


def test_a_worker_runs_on_the_gpu_its_launcher_chose(procs: Procs, settings: Settings,
                                                     tmp_path: Path,
                                                     gpus: list[Device]) -> None:
    url = _stack(procs, _models(tmp_path, probe=_probe(1, 1)))
    wait_until(workers_ready(settings, "probe", 1), READY_S, "a probe worker on a GPU")
    (hb,) = _beats(settings, "probe")
    first = gpus[0]  # the allocator's first choice: the first device in PCI order
    assert (hb["device"], hb["device_uuid"]) == (first.label, first.uuid)
    # torch inside the worker sees exactly that GPU (the launcher pinned it by UUID).
    assert hb["torch_uuid"] == first.uuid, hb
    done = _run(url, "probe", [{"x": float(i)} for i in range(32)])
    # The model's tensors live on the worker's GPU, and the job metrics name it.
    assert {(d["output"]["device"], d["output"]["uuid"]) for d in done} == {("cuda:0",
                                                                             first.uuid)}
    assert {d["metrics"]["device"] for d in done} == {first.label}
    assert [d["output"]["y"] for d in done] == [float(i) for i in range(32)]
    _record("pinned", device=first.label, uuid=first.uuid, torch_uuid=hb["torch_uuid"],
            torch_threads_share=f"{os.cpu_count()} cores / {len(gpus)} GPU(s)")


def test_workers_get_distinct_physical_gpus(procs: Procs, settings: Settings, tmp_path: Path,
                                            gpus: list[Device]) -> None:
    _need_two(gpus)
    url = _stack(procs, _models(tmp_path, probe=_probe(2, 2)))
    wait_until(workers_ready(settings, "probe", 2), READY_S, "two probe workers")
    beats = _beats(settings, "probe")
    uuids = [b["torch_uuid"] for b in beats]
    assert len(set(uuids)) == 2, beats
    assert all(b["torch_uuid"] == b["device_uuid"] for b in beats), beats
    done = _run(url, "probe", [{"x": 1.0}] * 200)
    assert {d["output"]["uuid"] for d in done} <= set(uuids)
    _record("distinct", workers={b["name"]: b["torch_uuid"] for b in beats})


def test_two_models_never_share_a_gpu_while_another_is_free(procs: Procs, settings: Settings,
                                                            tmp_path: Path,
                                                            gpus: list[Device]) -> None:
    _need_two(gpus)
    url = _stack(procs, _models(tmp_path, first=_probe(1, 1), second=_probe(1, 1)))
    for model in ("first", "second"):
        wait_until(workers_ready(settings, model, 1), READY_S, f"a {model} worker")
    where = {m: _beats(settings, m)[0]["torch_uuid"] for m in ("first", "second")}
    assert where["first"] != where["second"], where
    for model, uuid in where.items():
        assert {d["output"]["uuid"] for d in _run(url, model, [{"x": 1.0}] * 16)} == {uuid}
    _record("two_models", placement=where)


def _throughput(procs: Procs, settings: Settings, tmp_path: Path, devices: str, n: int,
                jobs: int) -> float:
    sub = tmp_path / f"run{n}"
    sub.mkdir()
    url = _stack(procs, _models(sub, probe=_probe(n, n, matmuls=16)), devices, name=str(n))
    wait_until(workers_ready(settings, "probe", n), READY_S, f"{n} probe workers")
    _run(url, "probe", [{"x": 1.0}] * 32)  # warm-up: CUDA kernels, the batcher's fit
    t0 = time.monotonic()
    _run(url, "probe", [{"x": 1.0}] * jobs)
    return jobs / (time.monotonic() - t0)


def test_two_workers_on_two_gpus_beat_one(procs: Procs, settings: Settings, tmp_path: Path,
                                          gpus: list[Device]) -> None:
    _need_two(gpus)
    jobs = 800  # 100 batches of 8, each 16 matmuls of 4096x4096 in float32: GPU-bound
    one = _throughput(procs, settings, tmp_path, f"cuda:{gpus[0].uuid}", 1, jobs)
    procs.stop_all()
    procs.all.clear()
    redis.Redis.from_url(settings.redis_url).flushall()
    two = _throughput(procs, settings, tmp_path, f"cuda:{gpus[0].uuid},{gpus[1].uuid}", 2,
                      jobs)
    _record("scaling", one_gpu_jobs_per_s=round(one, 1), two_gpus_jobs_per_s=round(two, 1),
            speedup=round(two / one, 2))
    assert two > 1.3 * one, (one, two)


def _inputs(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    # Three decimals keep a job's body small; the reference run uses the same rounded values.
    return [{"features": [round(rng.uniform(-1, 1), 3) for _ in range(IN_FEATURES)]}
            for _ in range(n)]


def test_mlp_on_gpu_matches_cpu(procs: Procs, settings: Settings, tmp_path: Path,
                                gpus: list[Device]) -> None:
    url = _stack(procs, _models(tmp_path, mlp='class = "workers.builtin.mlp:MLPModel"\n'
                                             "min_workers = 1\nmax_workers = 1\n"
                                             "max_batch_size = 64\nmax_latency_ms = 250\n"))
    wait_until(workers_ready(settings, "mlp", 1), READY_S, "an mlp worker on a GPU")
    inputs = _inputs(256, seed=1)
    done = _run(url, "mlp", inputs)
    assert {d["metrics"]["device"] for d in done} == {gpus[0].label}
    net = build_mlp("cpu")
    with torch.inference_mode():
        want = net(torch.tensor([x["features"] for x in inputs], dtype=torch.float32))
    got = torch.tensor([d["output"]["logits"] for d in done], dtype=torch.float32)
    worst = float((got - want).abs().max())
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max |gpu-cpu| = {worst}"
    t0 = time.monotonic()
    done = _run(url, "mlp", _inputs(2000, seed=2))
    elapsed = time.monotonic() - t0
    sizes = [d["metrics"]["batch_size"] for d in done]
    _record("mlp", device=gpus[0].label, jobs=2000, seconds=round(elapsed, 2),
            jobs_per_s=round(2000 / elapsed, 1), mean_batch=round(sum(sizes) / len(sizes), 1),
            max_abs_diff_vs_cpu=worst)
