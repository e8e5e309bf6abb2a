"""The model's own limit: the torch MLP in one process, no HTTP, no Redis, no batcher.

Set up as a worker is: on CPU, the process is pinned to one core and torch uses one thread
(workers/process.py `pin`); on CUDA, the model sits on cuda:0. For each batch size it times
- `forward`: the network on a ready tensor (the pure torch cost), and
- `predict`: MLPModel.predict on a list of validated inputs (tensor built from Python floats,
  logits back to Python lists), which is what a worker runs per batch.
It reports rows/s for each, the best batch size (up to the serving max_batch_size) and the
batch-of-one time. `--workers N` runs N such processes at once, one per core, and sums them.

    python -m bench.model_limit --device cpu --workers 1 --out limit.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.docs import emit_json

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _pin(core_index: int, device: str) -> int:
    """Pin like a worker does; returns the torch thread count it uses."""
    if device.startswith("cuda") or not hasattr(os, "sched_setaffinity"):
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[core_index % len(cores)]})
    return 1


def measure(device: str, core_index: int, seconds_per_size: float, reps: int,
            sizes: tuple[int, ...] = BATCH_SIZES) -> dict[str, Any]:
    threads = _pin(core_index, device)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    from workers.builtin.mlp import IN_FEATURES, MLPInput, MLPModel

    torch.set_num_threads(threads)
    torch_device = "cuda:0" if device.startswith("cuda") else "cpu"
    model = MLPModel()
    model.load(torch_device)
    gen = torch.Generator().manual_seed(1)
    data = (torch.rand(max(sizes), IN_FEATURES, generator=gen) * 2 - 1)
    items = [MLPInput(features=row) for row in data.tolist()]

    def sync() -> None:
        if torch_device != "cpu":
            torch.cuda.synchronize()

    def timed(fn: Any, budget_s: float) -> float:
        """Median seconds per call over `reps` runs of about budget_s/reps each."""
        per_rep = []
        for _ in range(reps):
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                if time.perf_counter() - t0 >= budget_s / reps:
                    break
            sync()
            per_rep.append((time.perf_counter() - t0) / n)
        return statistics.median(per_rep)

    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for n in sizes:
            x = data[:n].to(torch_device)
            batch = items[:n]
            for _ in range(3):  # warm-up
                model.net(x)
                model.predict(batch)
            sync()
            fwd = timed(lambda x=x: model.net(x), seconds_per_size)
            pred = timed(lambda batch=batch: model.predict(batch), seconds_per_size)
            rows.append({"batch_size": n, "forward_ms": fwd * 1000, "predict_ms": pred * 1000,
                         "forward_rows_per_s": n / fwd, "predict_rows_per_s": n / pred})
    best = max(rows, key=lambda r: r["forward_rows_per_s"])
    best_pred = max(rows, key=lambda r: r["predict_rows_per_s"])
    one = rows[0]
    return {
        "device": torch_device, "threads": threads, "torch": torch.__version__,
        "core": core_index if torch_device == "cpu" else None,
        "sizes": rows,
        "best_batch_size": best["batch_size"], "best_rows_per_s": best["forward_rows_per_s"],
        "best_predict_batch_size": best_pred["batch_size"],
        "best_predict_rows_per_s": best_pred["predict_rows_per_s"],
        "batch1_forward_ms": one["forward_ms"], "batch1_predict_ms": one["predict_ms"],
    }


def _child(args: tuple[str, int, float, int], out: Any) -> None:
    out.put(measure(*args))


def measure_workers(device: str, workers: int, seconds_per_size: float,
                    reps: int) -> dict[str, Any]:
    """`workers` processes at once (each pinned to its own core); summed rows/s."""
    if workers <= 1:
        single = measure(device, 0, seconds_per_size, reps)
        return {"workers": 1, "per_worker": [single], **_totals([single])}
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    procs = [ctx.Process(target=_child, args=((device, i, seconds_per_size, reps), q))
             for i in range(workers)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return {"workers": workers, "per_worker": results, **_totals(results)}


def _totals(results: list[dict[str, Any]]) -> dict[str, Any]:
    # Per batch size the sum over workers running at once; the best size is the best sum.
    sizes = [r["batch_size"] for r in results[0]["sizes"]]
    fwd = {n: sum(r["sizes"][i]["forward_rows_per_s"] for r in results)
           for i, n in enumerate(sizes)}
    pred = {n: sum(r["sizes"][i]["predict_rows_per_s"] for r in results)
            for i, n in enumerate(sizes)}
    best = max(fwd, key=lambda n: fwd[n])
    best_pred = max(pred, key=lambda n: pred[n])
    return {
        "best_batch_size": best, "best_rows_per_s": fwd[best],
        "best_predict_batch_size": best_pred, "best_predict_rows_per_s": pred[best_pred],
        "batch1_forward_ms": statistics.median(r["batch1_forward_ms"] for r in results),
        "batch1_predict_ms": statistics.median(r["batch1_predict_ms"] for r in results),
        "forward_rows_per_s": {str(n): v for n, v in fwd.items()},
        "predict_rows_per_s": {str(n): v for n, v in pred.items()},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seconds", type=float, default=1.0, help="per batch size and kind")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    result = measure_workers(a.device, a.workers, a.seconds, a.reps)
    emit_json(result, a.out)


if __name__ == "__main__":
    main()
