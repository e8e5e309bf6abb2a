"""Autoscaler reaction time: from a load step to the first added worker serving, as a multiple of
that worker's own start-up time. A benchmark, not a test: it measures, it does not assert.

    python -m bench.autoscale_reaction                  # both models, 5 repeats (~10 min)
    python -m bench.autoscale_reaction --models synthetic --repeats 1   # a quick look

What runs: a private redis-server, the gateway, the batcher and the autoscaler, each its own
process (as `asyncinfer up` runs them, without Flower), with a models file in which `synthetic`
and the torch `mlp` both scale between `min_workers = 0` and `max_workers = 2` on two CPU slots.

Each repeat pairs, back to back, for each model:
1. Own start-up, with the autoscaler stopped: a backlog is queued, then
   `python -m workers --model M --index 1` is spawned directly. Start-up is spawn → heartbeat
   `ready`; spawn → first job finished is kept too (Celery starts consuming a little after the
   heartbeat says ready), and the backlog's drain rate is one worker's capacity.
2. Reaction, autoscaler started again, one cycle:
   - 0→1: a burst of concurrency_target/2 jobs (one worker's worth) at t0;
   - 1→2: while that worker serves, a burst big enough to keep it busy for about three of its
     own start-ups (from the capacity measured in 1), so a second worker is wanted at once and
     still finds work when it arrives;
   - then idle: the workers drain one per `scale_down_delay_s`, down to zero.
   Reaction is t0 → the added worker's heartbeat `ready` (and → its first finished job), split
   into detection (t0 → the autoscaler's `up` decision) and start (decision → ready).

Results: JSON under bench/results/, the results section of docs/autoscaling.md (between its
markers) and docs/img/autoscale-reaction.png, docs/img/autoscale-timeline.png.

`BenchStack` and `leftover_pids` are shared with bench/soak.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import redis

from bench.docs import DOCS, IMG, REPO, RESULTS, replace_section
from shared import keys
from shared.devices import device_for, parse_devices, pinning_env
from shared.procs import free_port, spawn, terminate, wait_port
from shared.redisserver import RedisServer

DOC = DOCS / "autoscaling.md"
BEGIN = "<!-- autoscale-reaction:begin -->"
END = "<!-- autoscale-reaction:end -->"

DEVICES = "cpu:2"
SCALE_DOWN_DELAY_S = 8.0
# Both models scale from zero to two workers. The synthetic model's batch cost is raised from
# its default so that one worker is easy to saturate with a burst the bench can submit quickly.
MODELS_TOML = f"""\
# Written by bench/autoscale_reaction.py: both models scale 0..2 on two CPU slots.
[models.synthetic]
class = "workers.builtin.synthetic:SyntheticModel"
params = {{ a_s = 0.004, b_s = 0.010 }}
max_batch_size = 16
max_latency_ms = 100
concurrency_target = 32
min_workers = 0
max_workers = 2
scale_down_delay_s = {SCALE_DOWN_DELAY_S}

[models.mlp]
class = "workers.builtin.mlp:MLPModel"
max_batch_size = 64
max_latency_ms = 100
concurrency_target = 128
min_workers = 0
max_workers = 2
scale_down_delay_s = {SCALE_DOWN_DELAY_S}
"""
TARGETS = {"synthetic": 32, "mlp": 128}
BATCH = {"synthetic": 16, "mlp": 64}
MLP_FEATURES = 256
AUTOSCALER_PASS_S = 0.5  # workers.autoscaler.INTERVAL_S
POLL_S = 0.01  # heartbeat polling: the resolution of every "ready" time below
TIMELINE_EVERY = 10  # polls per timeline sample (0.1 s)


def now_ms() -> int:
    return int(time.time() * 1000)


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class BenchStack:
    """redis-server, gateway and batcher as processes, the autoscaler on demand, workers spawned
    directly on demand; `stop()` ends every one of them (they also die with this process)."""

    state_dir: Path
    models_toml: str
    devices: str = DEVICES
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    server: RedisServer | None = None
    port: int = 0

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def env(self) -> dict[str, str]:
        models = self.state_dir / "models.toml"
        return {"ASYNCINFER_REDIS_URL": self.redis_url, "ASYNCINFER_MODELS": str(models),
                "ASYNCINFER_DEVICES": self.devices, "ASYNCINFER_GATEWAY_PORT": str(self.port),
                "ASYNCINFER_LOG_DIR": str(self.logs), "ASYNCINFER_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1", **self.extra_env}

    def start(self, autoscaler: bool = False) -> BenchStack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "models.toml").write_text(self.models_toml)
        self.server = RedisServer(self.state_dir / "redis").start()
        self.port = free_port()
        self.procs["gateway"] = spawn(["-m", "gateway"], self.env, self.logs / "gateway.log")
        self.procs["batcher"] = spawn(["-m", "batcher"], self.env, self.logs / "batcher.log")
        if autoscaler:
            self.start_autoscaler()
        if not wait_port("127.0.0.1", self.port, 60):
            raise RuntimeError(f"gateway did not start; see {self.logs / 'gateway.log'}")
        return self

    def start_autoscaler(self) -> subprocess.Popen[bytes]:
        proc = spawn(["-m", "workers.autoscaler"], self.env, self.logs / "autoscaler.log")
        self.procs["autoscaler"] = proc
        return proc

    def spawn_worker(self, model: str, index: int) -> subprocess.Popen[bytes]:
        """A worker started by hand, pinned exactly as the local launcher would pin it."""
        device = device_for(parse_devices(self.devices), index)
        proc = spawn(["-m", "workers", "--model", model, "--index", str(index)],
                     {**self.env, **pinning_env(device, index)},
                     self.logs / f"direct-{model}-{index}.log")
        self.procs[f"worker-{model}-{index}-{proc.pid}"] = proc
        return proc

    def stop_proc(self, name: str, grace_s: float = 30.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            terminate(proc, grace_s=grace_s)

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items() if p.poll() is None}

    def stop(self) -> None:
        # The autoscaler drains its workers first; then hand-started workers, batcher, gateway.
        self.stop_proc("autoscaler", grace_s=60)
        for name in [n for n in self.procs if n.startswith("worker-")]:
            self.stop_proc(name)
        for name in list(self.procs):
            self.stop_proc(name, grace_s=10)
        if self.server is not None:
            url = self.server.url
            self.server.stop()
            for pid in leftover_pids(url):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                print(f"killed leftover process {pid}", file=sys.stderr)


def leftover_pids(redis_url: str) -> list[int]:
    """Processes still running with this stack's Redis URL in their environment."""
    found = []
    needle = f"ASYNCINFER_REDIS_URL={redis_url}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the stack."""
    def _exit(signum: int, _: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


# -- watching heartbeats -----------------------------------------------------------------------


@dataclass
class WorkerLife:
    """One worker process as its heartbeats showed it (epoch ms)."""

    name: str
    model: str
    index: int
    pid: int
    seen_ms: int
    serving_ms: int | None = None
    draining_ms: int | None = None
    gone_ms: int | None = None


class Observer:
    """Polls heartbeats and backlogs in a thread every POLL_S: when each worker process first
    appears, first serves, drains and disappears, plus a timeline of backlog and worker counts."""

    def __init__(self, redis_url: str, models: list[str]) -> None:
        self.redis_url = redis_url
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)
        self.models = models
        self.lives: dict[tuple[str, int], WorkerLife] = {}
        self.timeline: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def start(self) -> Observer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                self._poll(sample=n % TIMELINE_EVERY == 0)
            n += 1
            self._stop.wait(POLL_S)

    def _poll(self, sample: bool) -> None:
        pipe = self.r.pipeline(transaction=False)
        for m in self.models:
            pipe.hgetall(keys.workers(m))
            for stream in keys.streams(m):
                pipe.xlen(stream)
        replies = pipe.execute()
        t = now_ms()
        with self._lock:
            present: set[tuple[str, int]] = set()
            for i, m in enumerate(self.models):
                beats, backlog = replies[4 * i], sum(replies[4 * i + 1:4 * i + 4])
                counts = {"starting": 0, "serving": 0, "draining": 0}
                for raw in beats.values():
                    hb = json.loads(raw)
                    if hb.get("expires_ms", 0) <= t:
                        continue
                    key = (hb["name"], int(hb["pid"]))
                    present.add(key)
                    life = self.lives.setdefault(key, WorkerLife(
                        hb["name"], m, int(hb["index"]), int(hb["pid"]), t))
                    state = hb["state"]
                    if state in ("ready", "busy"):
                        counts["serving"] += 1
                        life.serving_ms = life.serving_ms or t
                    elif state == "draining":
                        counts["draining"] += 1
                        life.draining_ms = life.draining_ms or t
                    else:
                        counts["starting"] += 1
                if sample:
                    self.timeline.append({"t_ms": t, "model": m, "backlog": backlog, **counts})
            for key, life in self.lives.items():
                if key not in present and life.gone_ms is None:
                    life.gone_ms = t

    def find(self, pred: Callable[[WorkerLife], bool]) -> WorkerLife | None:
        with self._lock:
            hits = [life for life in self.lives.values() if pred(life)]
        return min(hits, key=lambda w: w.seen_ms) if hits else None

    def alive(self, model: str) -> int:
        with self._lock:
            return sum(1 for w in self.lives.values() if w.model == model and w.gone_ms is None)


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(POLL_S)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


# -- jobs --------------------------------------------------------------------------------------


def payloads(model: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    if model == "mlp":
        rng = random.Random(seed)
        # A small pool of distinct vectors, two decimals: small bodies, real compute.
        pool = [[round(rng.uniform(-1, 1), 2) for _ in range(MLP_FEATURES)] for _ in range(32)]
        return [{"features": pool[i % len(pool)]} for i in range(n)]
    return [{"x": float(i)} for i in range(n)]


def encode_batches(model: str, inputs: list[dict[str, Any]]) -> list[bytes]:
    """jobs:batch bodies, encoded before the clock starts (a burst should be a burst)."""
    chunk = 200 if model == "mlp" else 1000
    return [json.dumps({"inputs": inputs[i:i + chunk]}).encode()
            for i in range(0, len(inputs), chunk)]


def submit(client: httpx.Client, model: str, bodies: list[bytes]) -> list[str]:
    ids: list[str] = []
    for body in bodies:
        r = client.post(f"/v1/models/{model}/jobs:batch", content=body,
                        headers={"content-type": "application/json"})
        if r.status_code != 202:
            raise RuntimeError(f"submit failed: {r.status_code} {r.text[:300]}")
        ids += [j["id"] for j in r.json()["jobs"]]
    return ids


def final_counts(r: redis.Redis, model: str) -> dict[str, int]:
    raw: dict[str, str] = r.hgetall(keys.stats(model))  # type: ignore[assignment]
    return {k: int(v) for k, v in raw.items()}


def wait_final(r: redis.Redis, model: str, before: dict[str, int], n: int,
               timeout_s: float) -> None:
    """Until n more jobs of the model are final; any that did not succeed aborts the run."""
    def done() -> bool:
        now = final_counts(r, model)
        delta = {k: now.get(k, 0) - before.get(k, 0) for k in now}
        bad = {k: v for k, v in delta.items() if k != "succeeded" and v}
        if bad:
            raise RuntimeError(f"{model}: jobs did not succeed: {bad}")
        return delta.get("succeeded", 0) >= n

    wait_for(done, timeout_s, f"{n} {model} jobs")


def finished(r: redis.Redis, ids: list[str]) -> list[tuple[int, str]]:
    """(finished_ms, worker) of each job, in the order of ids."""
    out: list[tuple[int, str]] = []
    for i in range(0, len(ids), 2000):
        pipe = r.pipeline(transaction=False)
        for job_id in ids[i:i + 2000]:
            pipe.hmget(keys.job(job_id), "finished_ms", "worker")
        out += [(int(f), str(w)) for f, w in pipe.execute()]
    return out


def first_job_by(done: list[tuple[int, str]], name: str) -> int | None:
    mine = [ms for ms, worker in done if worker == name]
    return min(mine) if mine else None


def capacity(done: list[tuple[int, str]]) -> float:
    """Jobs/s over the middle 80% of a drained backlog (skips CORK's probe batches and the
    tail)."""
    ts = sorted(ms for ms, _ in done)
    lo, hi = len(ts) // 10, len(ts) - 1 - len(ts) // 10
    span_s = (ts[hi] - ts[lo]) / 1000
    return (hi - lo) / span_s if span_s > 0 else math.inf


def worker_processes(redis_url: str, model: str) -> list[int]:
    """Worker processes of this stack (its Redis URL in their environment) serving `model`."""
    return [pid for pid in leftover_pids(redis_url) if _is_worker(pid, model)]


def _is_worker(pid: int, model: str) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"workers" in cmd and model.encode() in cmd


def up_decision(r: redis.Redis, model: str, after_ms: int) -> dict[str, Any] | None:
    """The autoscaler's first `up` decision at or after `after_ms`."""
    raw: list[str] = r.lrange(keys.scale_history(model), 0, -1)  # type: ignore[assignment]
    ups = [d for d in map(json.loads, raw) if d["action"] == "up" and d["at_ms"] >= after_ms]
    return min(ups, key=lambda d: d["at_ms"]) if ups else None


# -- the two phases ----------------------------------------------------------------------------


@dataclass
class OwnStart:
    index: int
    ready_s: float
    first_job_s: float
    capacity_jobs_s: float | None  # only from a backlog of many batches
    backlog: int


def own_startup(stack: BenchStack, obs: Observer, r: redis.Redis, client: httpx.Client,
                model: str, index: int, backlog: int) -> OwnStart:
    """Queue a backlog, spawn one worker by hand at `index`, time it, drain it, stop it."""
    before = final_counts(r, model)
    ids = submit(client, model, encode_batches(model, payloads(model, backlog)))
    t0 = now_ms()
    proc = stack.spawn_worker(model, index)
    life = wait_for(lambda: obs.find(lambda w: w.pid == proc.pid and w.serving_ms is not None),
                    180, f"{model} worker ready")
    wait_final(r, model, before, backlog, 300)
    done = finished(r, ids)
    stack.stop_proc(next(n for n, p in stack.procs.items() if p is proc))
    wait_for(lambda: obs.alive(model) == 0, 30, f"{model} worker gone")
    assert life.serving_ms is not None
    return OwnStart(index=index, ready_s=(life.serving_ms - t0) / 1000,
                    first_job_s=(min(ms for ms, _ in done) - t0) / 1000,
                    capacity_jobs_s=round(capacity(done), 1) if backlog >= 10 * BATCH[model]
                    else None, backlog=backlog)


@dataclass
class Step:
    """One scale-up step: t0 is the load step; every figure is seconds after it."""

    kind: str  # "0->1" or "1->2"
    jobs: int
    t0_ms: int  # the load step (epoch ms)
    worker: str  # the added worker
    index: int  # its index, hence its device (CPU core)
    decision_s: float | None  # the autoscaler's `up` decision (detection)
    ready_s: float  # the added worker's heartbeat says ready
    first_job_s: float | None  # the added worker finished its first job
    start_s: float | None  # decision -> ready: the worker's start-up inside the stack


def scale_step(obs: Observer, r: redis.Redis, client: httpx.Client, model: str, kind: str,
               n: int) -> tuple[Step, int]:
    """Submit a burst of n jobs (the load step) and time the worker it adds."""
    bodies = encode_batches(model, payloads(model, n, seed=n))
    before = final_counts(r, model)
    t0 = now_ms()
    ids = submit(client, model, bodies)
    # The added worker is the first one to appear after the step. Not "index 1" or "index 2":
    # a worker launched while another still drains takes the next free index.
    life = wait_for(lambda: obs.find(lambda w: w.model == model and w.seen_ms >= t0
                                     and w.serving_ms is not None),
                    240, f"a new {model} worker serving")
    wait_final(r, model, before, n, 600)
    done = finished(r, ids)
    first = first_job_by(done, life.name)
    decision = up_decision(r, model, t0)
    assert life.serving_ms is not None
    step = Step(kind=kind, jobs=n, t0_ms=t0, worker=life.name, index=life.index,
                decision_s=(decision["at_ms"] - t0) / 1000 if decision else None,
                ready_s=(life.serving_ms - t0) / 1000,
                first_job_s=(first - t0) / 1000 if first is not None else None,
                start_s=(life.serving_ms - decision["at_ms"]) / 1000 if decision else None)
    return step, max(ms for ms, _ in done)


def cycle(obs: Observer, r: redis.Redis, client: httpx.Client, model: str,
          own: OwnStart) -> dict[str, Any]:
    """0 → 1 → 2 workers by two load steps, then idle until the autoscaler drained to 0."""
    target = TARGETS[model]
    began = now_ms()
    up1, _ = scale_step(obs, r, client, model, "0->1", max(1, target // 2))
    # Worker 1 settled and idle, well inside the scale-down delay; a random phase against the
    # autoscaler's passes, so detection times sample the whole pass interval.
    time.sleep(1.0 + random.uniform(0, AUTOSCALER_PASS_S))
    # Enough work to keep one worker busy for ~3 of its own start-ups: the second worker is
    # wanted at once and still finds a backlog when it is up.
    assert own.capacity_jobs_s is not None
    n2 = int(min(20_000, max(3 * target, own.capacity_jobs_s * 3 * own.first_job_s)))
    up2, idle_ms = scale_step(obs, r, client, model, "1->2", n2)
    # Zero means no heartbeat and no process: a drained worker removes its heartbeat a moment
    # before it exits, and until the autoscaler reaps it, it still holds its index.
    wait_for(lambda: obs.alive(model) == 0 and not worker_processes(obs.redis_url, model),
             4 * SCALE_DOWN_DELAY_S + 120, f"{model} drained to zero")
    time.sleep(2 * AUTOSCALER_PASS_S)  # the autoscaler's next pass reaps the exited workers
    # Workers of this cycle that left after the last job: one per scale-down delay.
    gone = sorted((w.gone_ms or 0) - idle_ms for w in obs.lives.values()
                  if w.model == model and w.seen_ms >= began and (w.gone_ms or 0) > idle_ms)
    return {"up": [asdict(up1), asdict(up2)],
            "down": {"idle_to_gone_s": [round(g / 1000, 2) for g in gone]}}


# -- reporting ---------------------------------------------------------------------------------


def _med(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return round(statistics.median(vs), 3) if vs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def summarise(own: list[dict[int, OwnStart]], cycles: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats. A step's ratio is the median over the repeats of its reaction
    divided by the own start-up, measured just before, of a worker at the same index."""
    ones = [pair[1] for pair in own]
    out: dict[str, Any] = {"capacity_jobs_s": _med([o.capacity_jobs_s for o in ones])}
    for i, kind in enumerate(("0->1", "1->2")):
        steps = [c["up"][i] for c in cycles]
        mine = [pair.get(s["index"], pair[1]) for s, pair in zip(steps, own, strict=True)]
        ready_ratios = [_ratio(s["ready_s"], o.ready_s) for s, o in zip(steps, mine, strict=True)]
        first_ratios = [_ratio(s["first_job_s"], o.first_job_s)
                        for s, o in zip(steps, mine, strict=True)]
        out[kind] = {
            "jobs": _med([s["jobs"] for s in steps]),
            "indexes": [s["index"] for s in steps],
            "own_ready_s": _med([o.ready_s for o in mine]),
            "own_first_job_s": _med([o.first_job_s for o in mine]),
            "own_ready_range_s": [min(o.ready_s for o in mine), max(o.ready_s for o in mine)],
            "decision_s": _med([s["decision_s"] for s in steps]),
            "start_s": _med([s["start_s"] for s in steps]),
            "ready_s": _med([s["ready_s"] for s in steps]),
            "first_job_s": _med([s["first_job_s"] for s in steps]),
            "ready_ratio": _med(ready_ratios),
            "first_job_ratio": _med(first_ratios),
            "ready_ratios": ready_ratios,
        }
    downs = [c["down"]["idle_to_gone_s"] for c in cycles if c["down"]["idle_to_gone_s"]]
    out["down_idle_to_gone_s"] = [_med([d[i] for d in downs if len(d) > i]) for i in range(2)]
    return out


def plot(result: dict[str, Any], ratio_png: Path, timeline_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["summary"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.2
    labels = [("0->1", "ready_ratio", "0→1 ready"), ("0->1", "first_job_ratio", "0→1 1st job"),
              ("1->2", "ready_ratio", "1→2 ready"), ("1->2", "first_job_ratio", "1→2 1st job")]
    for j, (kind, key, label) in enumerate(labels):
        vals = [result["summary"][m][kind][key] or 0 for m in models]
        bars = ax.bar([i + (j - 1.5) * width for i in range(len(models))], vals, width,
                      label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(models)),
                  [f"{m}\n(own start {result['summary'][m]['0->1']['own_ready_s']:.1f} s / "
                   f"{result['summary'][m]['1->2']['own_ready_s']:.1f} s)" for m in models])
    ax.set_ylabel("reaction / own start-up")
    ax.set_title("Autoscaler reaction time as a multiple of the worker's own start-up")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(ratio_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(models), 1, figsize=(8, 2.8 * len(models)), squeeze=False)
    for ax, m in zip(axes[:, 0], models, strict=True):
        span = result["models"][m]["last_cycle_window_ms"]
        pts = [p for p in result["timeline"]
               if p["model"] == m and span[0] <= p["t_ms"] <= span[1]]
        if not pts:
            continue
        t = [(p["t_ms"] - span[0]) / 1000 for p in pts]
        ax.plot(t, [p["backlog"] for p in pts], color="tab:blue", lw=1)
        ax.set_ylabel("backlog (jobs)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.step(t, [p["serving"] for p in pts], where="post", color="tab:green",
                 label="serving")
        ax2.step(t, [p["serving"] + p["starting"] for p in pts], where="post",
                 color="tab:orange", ls="--", label="serving + starting (heartbeats)")
        ax2.set_ylim(-0.1, 2.5)
        ax2.set_yticks([0, 1, 2])
        ax2.set_ylabel("workers")
        ax2.legend(loc="upper right", fontsize=7)
        for step in result["models"][m]["cycles"][-1]["up"]:
            t0 = (step["t0_ms"] - span[0]) / 1000
            ax.axvline(t0, color="k", lw=0.8, ls=":")
            if step["decision_s"] is not None:
                ax.axvline(t0 + step["decision_s"], color="tab:red", lw=0.8, ls="--")
        ax.set_title(f"{m}: one cycle (dotted: load steps; red dashed: the autoscaler's "
                     "up decisions)", fontsize=9)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(timeline_png, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"Measured {result['date']} on {result['machine']['cpus']} CPUs "
        f"(load average {result['machine']['loadavg_start'][0]:.1f} at the start, "
        f"{result['machine']['loadavg_end'][0]:.1f} at the end), "
        f"{result['repeats']} repeats per model, medians. A ratio is the median over the "
        f"repeats of the reaction divided by the own start-up of a worker at the same index "
        f"(same CPU core), measured just before. "
        f"`python -m bench.autoscale_reaction`, raw data in `bench/results/`.",
        "",
        "| model | step | jobs | own start-up: ready / 1st job (range of ready) | detection "
        "| start in stack | reaction: ready / 1st job | **ratio** ready / 1st job |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, v in s.items():
        for kind in ("0->1", "1->2"):
            k = v[kind]
            lo, hi = k["own_ready_range_s"]
            lines.append(
                f"| {m} | {kind.replace('->', '→')} | {k['jobs']:.0f} | "
                f"{_s(k['own_ready_s'])} / {_s(k['own_first_job_s'])} ({lo:.2f}–{hi:.2f} s) | "
                f"{_s(k['decision_s'])} | {_s(k['start_s'])} | "
                f"{_s(k['ready_s'])} / {_s(k['first_job_s'])} | "
                f"**{_x(k['ready_ratio'])}** / {_x(k['first_job_ratio'])} |")
    lines += [
        "",
        "Scale-down after the last job (`scale_down_delay_s` = "
        f"{SCALE_DOWN_DELAY_S:g} s, one worker per delay): "
        + "; ".join(f"{m}: 2→1 after {_s(v['down_idle_to_gone_s'][0])}, 1→0 after "
                    f"{_s(v['down_idle_to_gone_s'][1])}" for m, v in s.items()) + ".",
        "",
        "![reaction ratios](img/autoscale-reaction.png)",
        "",
        "![one cycle per model](img/autoscale-timeline.png)",
    ]
    return "\n".join(lines)


def _s(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f} s"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def write_doc(section: str, doc: Path) -> bool:
    return replace_section(doc, BEGIN, END, section)


# -- main --------------------------------------------------------------------------------------


def autoscaler_on(stack: BenchStack) -> None:
    """Start the autoscaler and wait until it runs its passes (its start-up must not count as
    detection time)."""
    log = stack.logs / "autoscaler.log"
    seen = log.read_text().count("autoscaler started") if log.exists() else 0
    stack.start_autoscaler()
    wait_for(lambda: log.exists() and log.read_text().count("autoscaler started") > seen, 60,
             "the autoscaler")
    # A random phase against its passes: the load step must not always land just after one.
    time.sleep(2 * AUTOSCALER_PASS_S + random.uniform(0, AUTOSCALER_PASS_S))


def run(models: list[str], repeats: int, state_dir: Path) -> dict[str, Any]:
    """Each repeat pairs one own start-up with one scaling cycle, back to back, so that the
    ratio compares the two under the same machine conditions (start-ups here vary by a second
    from minute to minute). The autoscaler is off during the own start-up: with a backlog queued
    and min_workers = 0 it would start a worker of its own."""
    stack = BenchStack(state_dir, MODELS_TOML)
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "config": {"devices": DEVICES, "scale_down_delay_s": SCALE_DOWN_DELAY_S,
                   "concurrency_target": TARGETS, "models_toml": MODELS_TOML},
        "models": {}, "summary": {}}
    obs: Observer | None = None
    try:
        stack.start(autoscaler=False)
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        obs = Observer(stack.redis_url, models).start()
        # Per repeat, the own start-up at index 1 and at index 2 (each index is its own CPU
        # core, and the cores differ): a reaction is compared with the same index's start-up.
        own: dict[str, list[dict[int, OwnStart]]] = {m: [] for m in models}
        cycles: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
        windows: dict[str, list[int]] = {}
        with httpx.Client(base_url=stack.url, timeout=120) as client:
            for m in models:
                # The first start pays for a cold page cache: discarded.
                warm = own_startup(stack, obs, r, client, m, 1, 40 * BATCH[m])
                print(f"{m}: warm-up start {warm.ready_s:.2f}s", flush=True)
            for i in range(repeats):
                for m in models:
                    stack.stop_proc("autoscaler")
                    o = own_startup(stack, obs, r, client, m, 1, 40 * BATCH[m])
                    o2 = own_startup(stack, obs, r, client, m, 2, 2 * BATCH[m])
                    own[m].append({1: o, 2: o2})
                    autoscaler_on(stack)
                    began = now_ms() - 500
                    c = cycle(obs, r, client, m, o)
                    windows[m] = [began, now_ms()]
                    cycles[m].append(c)
                    print(f"{m} #{i + 1}: own start-up ready {o.ready_s:.2f}s / {o2.ready_s:.2f}s "
                          f"(index 1 / 2), first job {o.first_job_s:.2f}s "
                          f"({o.capacity_jobs_s:.0f} jobs/s); " + "; ".join(
                              f"{u['kind']} (index {u['index']}) ready {u['ready_s']:.2f}s "
                              f"first job {_s(u['first_job_s'])}" for u in c["up"])
                          + f"; down {c['down']['idle_to_gone_s']}", flush=True)
        for m in models:
            result["models"][m] = {"own_startup": [[asdict(o) for o in pair.values()]
                                                   for pair in own[m]],
                                   "cycles": cycles[m], "last_cycle_window_ms": windows[m]}
            result["summary"][m] = summarise(own[m], cycles[m])
        obs.stop()
        result["timeline"] = obs.timeline
        result["workers"] = [asdict(w) for w in obs.lives.values()]
    finally:
        if obs is not None:
            obs.stop()
        stack.stop()
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    return result


def main() -> None:
    """Run the benchmark and write JSON, plots and the docs section."""
    ap = argparse.ArgumentParser(prog="python -m bench.autoscale_reaction",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="synthetic,mlp")
    ap.add_argument("--repeats", type=int, default=5,
                    help="own start-ups and scaling cycles per model (medians are reported)")
    ap.add_argument("--no-docs", action="store_true",
                    help="write only the JSON (no plots, no docs/autoscaling.md update)")
    args = ap.parse_args()
    raise_on_sigterm()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    state_dir = RESULTS / f"autoscale-{stamp}"
    result = run([m.strip() for m in args.models.split(",") if m.strip()], args.repeats,
                 state_dir)
    out = RESULTS / f"autoscale-reaction-{stamp}.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"results: {out}; logs: {state_dir / 'logs'}")
    if not args.no_docs:
        IMG.mkdir(parents=True, exist_ok=True)
        plot(result, IMG / "autoscale-reaction.png", IMG / "autoscale-timeline.png")
        if write_doc(markdown(result), DOC):
            print(f"updated {DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
