"""The autoscaler's local launcher with real processes: devices shared out across models, and a
model whose workers crash on start backs off, is given up, and leaves the others serving."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared import keys
from shared.devices import Device, pinning_env
from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready

pytestmark = pytest.mark.slow

MODEL = """
[models.{name}]
class = "workers.builtin.synthetic:SyntheticModel"
params = {{ a_s = 0.001, b_s = 0.005{extra} }}
max_batch_size = 16
batch_timeout_s = 4
concurrency_target = 8
max_workers = 1
"""


def models_file(tmp_path: Path, **extra: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text("".join(MODEL.format(name=name, extra=more) for name, more in extra.items()))
    return path


def submit(url: str, model: str, n: int, **fields: Any) -> list[str]:
    inputs = [{"x": i, **fields} for i in range(n)]
    r = httpx.post(f"{url}/v1/models/{model}/jobs:batch", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 202, r.text
    return [j["id"] for j in r.json()["jobs"]]


def final(url: str, ids: list[str]) -> list[dict[str, Any]]:
    return [httpx.get(f"{url}/v1/jobs/{i}", params={"wait": 60}, timeout=70).json() for i in ids]


def test_two_models_on_two_slots_get_one_device_each(procs: Procs, settings: Settings,
                                                     tmp_path: Path) -> None:
    models = str(models_file(tmp_path, first="", second=""))
    procs.start("batcher-models", "batcher", ASYNCINFER_MODELS=models)
    procs.autoscaler(ASYNCINFER_MODELS=models, ASYNCINFER_DEVICES="cpu:2")
    url = procs.gateway(ASYNCINFER_MODELS=models)
    jobs = {m: submit(url, m, 40, sleep_s=0.02) for m in ("first", "second")}
    done = {m: final(url, ids) for m, ids in jobs.items()}
    devices = {}
    for model, finals in done.items():
        assert [d["status"] for d in finals] == ["succeeded"] * 40, finals[0]
        # One worker each (max_workers = 1): every job of a model names the same slot.
        (devices[model],) = {d["metrics"]["device"] for d in finals}
    assert sorted(devices.values()) == ["cpu:0", "cpu:1"], devices
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    for model, device in devices.items():
        (beat,) = [json.loads(v) for v in r.hgetall(keys.workers(model)).values()]
        assert beat["device"] == device
        assert beat["name"].startswith(f"{model}-1-{device.replace(':', '')}@")
    print(f"two models on two slots: {devices}")


def test_a_crash_looping_model_backs_off_then_is_given_up(procs: Procs, settings: Settings,
                                                          tmp_path: Path) -> None:
    models = str(models_file(tmp_path, synthetic="", broken=", fail_load = true"))
    procs.start("batcher-models", "batcher", ASYNCINFER_MODELS=models)
    scaler = procs.autoscaler(ASYNCINFER_MODELS=models, ASYNCINFER_DEVICES="cpu:2")
    url = procs.gateway(ASYNCINFER_MODELS=models)
    broken_job = submit(url, "broken", 1)[0]
    states: list[dict[str, Any]] = []

    def launcher() -> dict[str, Any]:
        info = httpx.get(f"{url}/v1/models/broken", timeout=10).json()
        entry: dict[str, Any] = (info["launcher"] or [{}])[0]
        if entry and (not states or entry != states[-1]):
            states.append(entry)
        return entry

    # Meanwhile the healthy model serves as usual.
    served = submit(url, "synthetic", 20)
    wait_until(workers_ready(settings, "synthetic", 1), 60, "a synthetic worker")
    wait_until(lambda: launcher().get("state") == "failed", 120, "the broken model given up")
    assert [d["status"] for d in final(url, served)] == ["succeeded"] * 20
    assert [d["status"] for d in final(url, submit(url, "synthetic", 20))] == ["succeeded"] * 20

    last = states[-1]
    assert last["restarts"] == last["start_failures"] == 5
    assert last["retry_in_s"] is None and last["last_exit_code"] == 1
    assert "synthetic load failure" in last["last_error"]
    # On the way there GET /v1/models showed the backoff growing.
    waits = [s["retry_in_s"] for s in states if s["state"] == "backoff"]
    assert waits and max(waits) > 2.0, states
    # The log says the same, one line per crash, with each delay doubling.
    log = (procs.log_dir / "autoscaler.log").read_text()
    delays = [float(line.split("restart_in_s=")[1].split()[0]) for line in log.splitlines()
              if "worker crashed model=broken" in line]
    assert delays == [1.0, 2.0, 4.0, 8.0], delays
    assert "model given up model=broken" in log
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'asyncinfer_launch_failed_autoscalers{model="broken"} 1.0' in metrics
    assert 'asyncinfer_worker_restarts_total{model="broken"} 5.0' in metrics
    assert 'asyncinfer_launch_failed_autoscalers{model="synthetic"} 0.0' in metrics
    # Its job waits (a fix and an autoscaler restart will run it); nothing is left starting.
    assert httpx.get(f"{url}/v1/jobs/{broken_job}", timeout=10).json()["status"] == "queued"
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    assert r.hlen(keys.worker_claims("broken")) == 0
    assert scaler.poll() is None
    print(f"crash loop: {len(states)} states seen, backoff {delays} s, then given up")


def test_a_gpu_worker_without_cuda_stops_with_a_clear_error(procs: Procs) -> None:
    # This machine's torch is a CPU build: a worker handed a GPU must say so and exit, not serve
    # on the CPU.
    worker = procs.start("worker-nocuda", "workers", "--model", "synthetic",
                         **pinning_env(Device("cuda", 3, "GPU-0000aaaa"), 1))
    assert worker.wait(120) != 0
    log = (procs.log_dir / "worker-nocuda.log").read_text()
    assert "given cuda:3 (GPU-0000aaaa) but torch sees no CUDA device" in log, log[-2000:]
    assert "CUDA_VISIBLE_DEVICES='GPU-0000aaaa'" in log
