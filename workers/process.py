"""One worker process: pin to its device, load the model, then serve batches as a Celery worker.

Pool choice: Celery's `threads` pool inside a process that the launcher started with its device
already chosen. There is no fork at all, so CUDA can never be initialised before a fork; the
model loads before the worker consumes (no child start-up limit applies); Celery's main thread
keeps sending heartbeats and answering remote control while batches run in pool threads; and
several batches can be in flight so preprocess/postprocess overlap a running predict. The price
is that Celery cannot kill a stuck thread, so the batch time limit is enforced here: the batch's
jobs are failed and, if predict is still stuck after a grace period, the process exits for its
launcher to restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from typing import Any

from celery import signals

from shared import keys
from shared.celeryapp import BATCH_TASK, make_celery
from shared.devices import Device, device_for, from_env, parse_devices
from shared.heartbeats import Heartbeat, HeartbeatPublisher, worker_name
from shared.model import ModelContext
from shared.modelspec import ModelSpec, load_specs
from shared.redisconn import connect
from shared.settings import Settings
from shared.store import JobStore
from workers import context, devicecheck
from workers.loop import LoopThread
from workers.runtime import BatchRequest, BatchTimeout, ModelRuntime

log = logging.getLogger(__name__)

STUCK_EXIT_CODE = 70
STUCK_GRACE_S = 2.0


def compute_cores(device: Device) -> set[int] | None:
    """The core a CPU slot computes on; None for a GPU (the process is not pinned)."""
    if device.kind != "cpu" or not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return {cores[device.ordinal % len(cores)]}


def pin_thread(cores: set[int] | None) -> None:
    """Pin the calling thread (Linux affinity is per thread) to `cores`."""
    if cores is not None:
        os.sched_setaffinity(0, cores)


class Worker:
    """Wires the runtime, the heartbeat and the Celery worker of one (model, index)."""

    def __init__(self, settings: Settings, spec: ModelSpec, index: int) -> None:
        self.settings = settings
        self.spec = spec
        # The launcher chose the device and said so in the environment; only a worker started
        # by hand derives it from its index.
        self.device = from_env(os.environ) or device_for(parse_devices(settings.devices), index)
        # Only the threads that run the model are pinned to the slot's core: the Celery consumer,
        # the Redis I/O loop and per-item work float, so on a small machine they do not queue
        # behind the model on its core.
        self.cores = compute_cores(self.device)
        # A GPU worker takes its launcher's share of the host's cores (cores / workers).
        self.threads = 1 if self.cores is not None else settings.torch_threads or max(
            1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        self.name = worker_name(spec.name, index, self.device.slug, socket.gethostname())
        self.slots = spec.options.predict_concurrency + 1
        self.loop = LoopThread()
        self.redis = connect(settings)
        self.store = JobStore(self.redis, result_ttl_s=settings.result_ttl_s,
                              job_ttl_s=settings.job_ttl_s, max_attempts=settings.max_attempts)
        ctx = ModelContext(model=spec.name, worker_index=index, device=self.device.torch_device,
                           worker_name=self.name, device_label=self.device.label,
                           device_uuid=self.device.uuid)
        context.set_current(ctx)
        self.heartbeat = HeartbeatPublisher(self.redis, Heartbeat(
            name=self.name, model=spec.name, index=index, device=self.device.label,
            slots=self.slots, device_uuid=self.device.uuid, cores=sorted(self.cores or ())),
            settings.heartbeat_interval_s)
        self.runtime = ModelRuntime(spec, ctx, self.store,
                                    compute_thread_init=lambda: pin_thread(self.cores))
        self.app = make_celery(settings)
        # Celery's CLI only names its built-in pools; a configured class is taken when -P is
        # left out.
        self.app.conf.worker_pool = "workers.pool:WakingThreadPool"
        self.app.task(name=BATCH_TASK)(self._task)
        self._busy = 0

    def _task(self, model: str, batch_id: str, job_ids: list[str],
              dispatched_ms: float = 0) -> dict[str, Any]:
        req = BatchRequest(model, batch_id, job_ids, dispatched_ms)
        self._set_busy(+1)
        try:
            return self.loop.call(self._run(req))
        finally:
            self._set_busy(-1)

    def _set_busy(self, delta: int) -> None:
        self._busy += delta
        hb = self.heartbeat.hb
        hb.busy = self._busy
        if hb.state in ("ready", "busy"):
            hb.state = "busy" if self._busy else "ready"

    async def _run(self, req: BatchRequest) -> dict[str, Any]:
        limit_s = self.spec.options.batch_timeout_s
        try:
            # predict has its own limit (runtime.BatchTimeout); this outer one also bounds a
            # hung preprocess/postprocess and the wait for a predict slot.
            report = await asyncio.wait_for(self.runtime.run_batch(req),
                                            limit_s * (self.slots + 1))
        except (TimeoutError, BatchTimeout):
            await self.store.finish(self.runtime.timeout_outcomes(req))
            log.error("batch time limit batch=%s model=%s limit_s=%s", req.batch_id,
                      req.model, limit_s)
            deadline = time.monotonic() + STUCK_GRACE_S
            while self.runtime.stuck and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.runtime.stuck:
                log.error("predict stuck past time limit; exiting for restart worker=%s",
                          self.name)
                await self.heartbeat.remove()
                os._exit(STUCK_EXIT_CODE)
            return {"batch": req.batch_id, "timeout": True}
        fields: dict[Any, Any] = self.runtime.report_fields(report)
        await self.redis.xadd(keys.completions(req.model), fields,
                              maxlen=keys.COMPLETIONS_MAXLEN, approximate=True)
        return {"batch": req.batch_id, "ok": report.ok, "failed": report.failed}

    def run(self) -> None:
        """Load, then serve until a warm shutdown (SIGTERM: stop taking batches, finish, exit)."""
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        hb_task = self.loop.spawn(self.heartbeat.run())
        self.loop.call(self.heartbeat.publish())
        try:
            self.heartbeat.hb.torch_uuid = devicecheck.verify(self.device)
            self.runtime.load()
            _set_torch_threads(self.threads)
            self.heartbeat.hb.state = "ready"
            self.loop.call(self.heartbeat.publish())
            signals.worker_shutting_down.connect(self._on_shutdown, weak=False)
            log.info("worker ready worker=%s device=%s slots=%d", self.name, self.device.label,
                     self.slots)
            self.app.worker_main([
                "worker", "-c", str(self.slots), "-n", self.name,
                "-Q", keys.celery_queue(self.spec.name), "--without-gossip",
                "--without-mingle", "--loglevel", self.settings.log_level,
            ])
        finally:
            hb_task.cancel()
            self.loop.call(self.heartbeat.remove(), timeout_s=5)
            self.loop.stop()
            log.info("worker stopped worker=%s", self.name)

    def _on_shutdown(self, **_: Any) -> None:
        self.heartbeat.hb.state = "draining"
        self.loop.spawn(self.heartbeat.publish())
        log.info("worker draining worker=%s busy=%d", self.name, self._busy)


def _set_torch_threads(n: int) -> None:
    # Only if the model imported torch: importing it here would cost a model without torch a
    # second of start-up. OMP_NUM_THREADS, set before the load, already sized torch's pool.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def main(settings: Settings, model: str, index: int) -> None:
    specs = load_specs(settings.models)
    Worker(settings, specs[model], index).run()
