"""The local launcher: worker subprocesses on this machine, one per (model, device).

- Devices are shared out across models host-wide (`workers.allocation`): a new worker goes to
  the least loaded device, so no two workers share one while another is free.
- The launcher hands each worker its device, index, name and torch thread count in its
  environment before it starts (so CUDA_VISIBLE_DEVICES is set before CUDA can initialise); the
  worker trusts them rather than looking again.
- A worker is stopped by draining (SIGTERM: Celery's warm shutdown stops consuming, finishes
  its batch, exits). One that exits unasked is a crash: its model restarts with backoff
  (`shared.backoff`), and a model whose workers keep dying before they serve is given up.
- Every child dies with the launcher (see shared.procs), even when it is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.backoff import BackoffConfig, CrashLoop
from shared.devices import Device, host_cores, pinning_env
from shared.heartbeats import worker_name
from shared.procs import spawn, terminate
from workers import allocation

log = logging.getLogger(__name__)

TORCH_THREADS_ENV = "ASYNCINFER_TORCH_THREADS"


@dataclass(frozen=True)
class Plan:
    """A worker about to start: claimed under `name` before it is launched."""

    model: str
    index: int
    device: Device
    name: str


@dataclass
class WorkerProc:
    model: str
    index: int
    device: Device
    name: str
    proc: subprocess.Popen[bytes]
    started_s: float
    log_path: Path | None = None
    up: bool = False  # seen serving once
    draining: bool = False
    drain_since: float | None = None


def torch_threads_per_worker(devices: list[Device]) -> int:
    """Cores / workers the host runs at most: a CPU slot computes on its one core; GPU workers
    split the host's cores so their CPU-side torch work does not oversubscribe them."""
    if any(d.kind == "cpu" for d in devices):
        return 1
    return max(1, host_cores() // max(1, len(devices)))


def _last_line(path: Path | None) -> str:
    """The last non-empty line of a worker's log: usually the error it died of."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    return next((ln for ln in reversed(lines) if ln), "")[:500]


@dataclass
class LocalLauncher:
    devices: list[Device]
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    drain_grace_s: float = 90.0
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    torch_threads: int | None = None
    host: str = field(default_factory=socket.gethostname)
    workers: dict[str, WorkerProc] = field(default_factory=dict)
    loops: dict[str, CrashLoop] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)

    def of(self, model: str) -> list[WorkerProc]:
        return sorted((w for w in self.workers.values() if w.model == model),
                      key=lambda w: w.index)

    def loop(self, model: str) -> CrashLoop:
        if model not in self.loops:
            self.loops[model] = CrashLoop(time.monotonic, self.backoff)
        return self.loops[model]

    def _placed(self) -> list[allocation.Placement]:
        return [allocation.Placement(w.model, w.device) for w in self.workers.values()]

    def room(self, model: str, per_device: int = 1) -> int:
        """Workers `model` may still start here now: 0 while it backs off or was given up."""
        if not self.loop(model).may_start():
            return 0
        return allocation.room(self.devices, self._placed(), model, per_device)

    def plan(self, model: str, per_device: int = 1) -> Plan | None:
        """The next worker of `model`: lowest free index, least loaded device, its name."""
        if not self.loop(model).may_start():
            return None
        device = allocation.pick(self.devices, self._placed(), model, per_device)
        if device is None:
            return None
        used = {w.index for w in self.of(model)}
        index = next(i for i in range(1, len(used) + 2) if i not in used)
        return Plan(model, index, device, worker_name(model, index, device.slug, self.host))

    def start(self, plan: Plan) -> WorkerProc:
        threads = self.torch_threads or torch_threads_per_worker(self.devices)
        env = {**self.env, **pinning_env(plan.device, plan.index),
               TORCH_THREADS_ENV: str(threads)}
        log_path = (self.log_dir / f"worker-{plan.model}-{plan.index}-{plan.device.slug}.log"
                    if self.log_dir else None)
        proc = spawn(["-m", "workers", "--model", plan.model, "--index", str(plan.index)], env,
                     log_path)
        worker = WorkerProc(plan.model, plan.index, plan.device, plan.name, proc,
                            time.monotonic(), log_path)
        self.workers[plan.name] = worker
        log.info("worker launched model=%s worker=%s device=%s uuid=%s threads=%d pid=%d",
                 plan.model, plan.name, plan.device.label, plan.device.uuid or "-", threads,
                 proc.pid)
        return worker

    def mark_up(self, worker: WorkerProc) -> None:
        """The worker's heartbeat said it serves: its model's start-failure streak ends."""
        if not worker.up:
            worker.up = True
            self.loop(worker.model).up()

    def drain_candidate(self, model: str, busy: set[str]) -> WorkerProc | None:
        """The worker to remove: the highest index that is idle, else the highest."""
        candidates = [w for w in self.of(model) if not w.draining]
        idle = [w for w in candidates if w.name not in busy]
        pool = idle or candidates
        return pool[-1] if pool else None

    def drain(self, worker: WorkerProc) -> None:
        worker.draining = True
        worker.drain_since = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        log.info("worker draining model=%s worker=%s pid=%d", worker.model, worker.name,
                 worker.proc.pid)

    def reap(self) -> list[WorkerProc]:
        """Collect exited workers (drained or crashed) and escalate drains past their grace.
        A crash feeds its model's backoff; returns every worker that exited."""
        gone = []
        now = time.monotonic()
        for name, w in list(self.workers.items()):
            code = w.proc.poll()
            if code is None:
                if w.drain_since is not None and now - w.drain_since > self.drain_grace_s:
                    terminate(w.proc, grace_s=0)
                continue
            del self.workers[name]
            gone.append(w)
            if w.draining:
                log.info("worker stopped model=%s worker=%s code=%s", w.model, name, code)
                continue
            self._crashed(w, code)
        return gone

    def _crashed(self, w: WorkerProc, code: int | None) -> None:
        loop = self.loop(w.model)
        delay = loop.exited(code, was_up=w.up)
        error = _last_line(w.log_path)
        self.last_error[w.model] = error
        if loop.gave_up:
            log.error("model given up model=%s worker=%s code=%s start_failures=%d: its "
                      "workers keep exiting before they serve; fix it and restart the "
                      "autoscaler. last log line: %s", w.model, w.name, code,
                      loop.start_failures, error or "-")
        else:
            log.warning("worker crashed model=%s worker=%s code=%s up=%s start_failures=%d "
                        "restart_in_s=%.1f last_log=%r", w.model, w.name, code, w.up,
                        loop.start_failures, delay, error)

    def state(self, model: str) -> dict[str, Any]:
        """The launcher's view of `model`, as GET /v1/models/{m} shows it."""
        loop = self.loop(model)
        return {"state": loop.state, "workers": [w.name for w in self.of(model)],
                "restarts": loop.restarts, "start_failures": loop.start_failures,
                "retry_in_s": round(loop.retry_in_s(), 1) if not loop.gave_up else None,
                "last_exit_code": loop.last_exit, "last_error": self.last_error.get(model, "")}

    def stop_all(self) -> None:
        """Drain every worker at once, then wait for them (escalating past the grace)."""
        for w in self.workers.values():
            w.draining = True
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        for w in list(self.workers.values()):
            terminate(w.proc, grace_s=self.drain_grace_s)
        self.workers.clear()
