"""The local launcher: worker subprocesses on this machine, one per (model, worker index).

Each worker gets the lowest free index, hence its device; it is stopped by draining (SIGTERM:
Celery's warm shutdown stops consuming, finishes its batch, exits); a worker that dies without
being asked is restarted on the same index. Every child dies with the launcher (see shared.procs).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.devices import Device, device_for, pinning_env
from shared.procs import spawn, terminate

log = logging.getLogger(__name__)


@dataclass
class WorkerProc:
    model: str
    index: int
    device: Device
    proc: subprocess.Popen[bytes]
    started_s: float
    draining: bool = False
    drain_since: float | None = None
    restarts: int = 0


@dataclass
class LocalLauncher:
    devices: list[Device]
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    drain_grace_s: float = 90.0
    workers: dict[tuple[str, int], WorkerProc] = field(default_factory=dict)

    def of(self, model: str) -> list[WorkerProc]:
        return [w for (m, _), w in sorted(self.workers.items()) if m == model]

    def free_devices(self, model: str, max_workers: int) -> int:
        used = len(self.of(model))
        return max(0, min(len(self.devices), max_workers) - used)

    def start(self, model: str, restarts: int = 0, index: int | None = None) -> WorkerProc:
        used = {w.index for w in self.of(model)}
        if index is None:
            index = next(i for i in range(1, len(used) + 2) if i not in used)
        device = device_for(self.devices, index)
        env = {**self.env, **pinning_env(device, index)}
        log_path = self.log_dir / f"worker-{model}-{index}.log" if self.log_dir else None
        proc = spawn(["-m", "workers", "--model", model, "--index", str(index)], env, log_path)
        worker = WorkerProc(model, index, device, proc, time.monotonic(), restarts=restarts)
        self.workers[(model, index)] = worker
        log.info("worker launched model=%s index=%d device=%s pid=%d", model, index,
                 device.label, proc.pid)
        return worker

    def drain_one(self, model: str, busy_indexes: set[int]) -> WorkerProc | None:
        """Begin draining one worker: the highest index that is idle, else the highest."""
        candidates = [w for w in self.of(model) if not w.draining]
        if not candidates:
            return None
        idle = [w for w in candidates if w.index not in busy_indexes]
        worker = (idle or candidates)[-1]
        worker.draining = True
        worker.drain_since = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGTERM)
        log.info("worker draining model=%s index=%d pid=%d", model, worker.index,
                 worker.proc.pid)
        return worker

    def reap(self) -> list[WorkerProc]:
        """Collect exited workers: drained ones are gone, crashed ones restart. Also escalates
        drains that outlived their grace. Returns the crashed workers that were restarted."""
        restarted = []
        now = time.monotonic()
        for key, w in list(self.workers.items()):
            code = w.proc.poll()
            if code is None:
                if w.drain_since is not None and now - w.drain_since > self.drain_grace_s:
                    terminate(w.proc, grace_s=0)
                continue
            del self.workers[key]
            if w.draining:
                log.info("worker stopped model=%s index=%d code=%s", w.model, w.index, code)
            else:
                log.warning("worker crashed model=%s index=%d code=%s; restarting", w.model,
                            w.index, code)
                restarted.append(self.start(w.model, restarts=w.restarts + 1, index=w.index))
        return restarted

    def stop_all(self) -> None:
        """Drain every worker at once, then wait for them (escalating past the grace)."""
        for w in self.workers.values():
            w.draining = True
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        for w in list(self.workers.values()):
            terminate(w.proc, grace_s=self.drain_grace_s)
        self.workers.clear()
