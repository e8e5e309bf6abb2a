"""One worker process: pin to its device, load the model, then serve batches as a Celery worker.

Pool choice: Celery's `solo` pool, in a process that the launcher started with its device already
chosen, and a task that only hands the batch over: it starts the batch on the worker's asyncio
loop thread and returns at once. So there is no fork at all (CUDA can never be initialised
before a fork); the model loads before the worker consumes (no child start-up limit applies);
Celery's consumer loop is never blocked by a batch, so it keeps beating (see
`workers.liveness`), answering remote control and taking the next batch; several batches are in
flight so preprocess/postprocess overlap a running predict; and a batch reaches the model with
no hop through a pool thread. How many batches a worker holds is the batcher's decision (its
lanes), not Celery's. Flower shows each task's hand-off; the batch's run time is in the job
metrics and the batcher's state. Celery cannot kill a stuck thread, so the time limit is enforced
here:
a batch whose predict is stuck past it is reported to the batcher and the process exits for its
launcher to restart; the batcher runs the batch's jobs again as suspects, so a hanging item ends
up alone and fails alone (`timeout`) while its mates finish.

Each process has its own identity (`worker_id`, new at every start), its own Celery queue and
its own stream consumer: the batcher routes each batch to one worker and always knows which
worker holds which entries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import secrets
import socket
import sys
import time
from typing import Any

from celery import signals
from celery.worker.request import Request
from kombu.entity import Queue

from shared import keys, tracing
from shared.celeryapp import BATCH_TASK, make_celery
from shared.devices import Device, device_for, from_env, parse_devices
from shared.heartbeats import Heartbeat, HeartbeatPublisher, worker_name
from shared.model import ModelContext
from shared.modelspec import ModelSpec, load_specs
from shared.redisconn import connect, connect_sync
from shared.settings import Settings
from shared.store import JobStore, Outcome
from shared.syncstore import BlockingWrites
from workers import context, devicecheck, liveness
from workers.direct import DirectPath, DirectResult
from workers.loop import LoopThread
from workers.refresh import HeldEntries
from workers.runtime import BatchReport, BatchRequest, BatchTimeout, ModelRuntime

log = logging.getLogger(__name__)


class NoAckRequest(Request):  # type: ignore[misc]
    """A batch task's request that sends no ack. Its queue is consumed with no_ack, so the
    transport records nothing to ack; yet kombu's Redis transport still ran an ack (a MULTI,
    ZREM, HDEL, EXEC round trip on the consumer's thread) for every message, because its
    messages carry no consumer tag to match against the no-ack set."""

    def acknowledge(self) -> None:
        self.acknowledged = True

STUCK_EXIT_CODE = 70


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
        # New at every start (a token after the stable name): a restarted worker never inherits
        # its predecessor's queue or entries (those go back to the batcher when the old
        # identity's heartbeat lapses).
        base = worker_name(spec.name, index, self.device.slug, socket.gethostname())
        self.worker_id = f"{base}.{secrets.token_hex(3)}"
        self.lanes = spec.options.predict_concurrency
        self.loop = LoopThread()
        self._side_beat: concurrent.futures.Future[Any] | None = None
        self.redis = connect(settings)
        self.store = JobStore(self.redis, result_ttl_s=settings.result_ttl_s,
                              job_ttl_s=settings.job_ttl_s, max_attempts=settings.max_attempts)
        ctx = ModelContext(model=spec.name, worker_index=index, device=self.device.torch_device,
                           worker_name=self.worker_id, device_label=self.device.label,
                           device_uuid=self.device.uuid)
        context.set_current(ctx)
        self.heartbeat = HeartbeatPublisher(self.redis, Heartbeat(
            name=self.worker_id, model=spec.name, index=index, device=self.device.label,
            lanes=self.lanes, device_uuid=self.device.uuid, cores=sorted(self.cores or ()),
            base=base),
            settings.heartbeat_interval_s, settings.heartbeat_lapse_s)
        self.held = HeldEntries(self.redis, spec.name, keys.worker_consumer(self.worker_id))
        # Bisection of a poison batch runs a job in up to log2(max_batch_size) + 1 groups
        # before it runs alone; past that many starts something else keeps killing it.
        attempt_cap = settings.max_attempts + 2 * math.ceil(
            math.log2(max(2, spec.options.max_batch_size))) + 2
        self.runtime = ModelRuntime(spec, ctx, self.store,
                                    consumer=keys.worker_consumer(self.worker_id),
                                    lane_free=self._lane_freed, attempt_cap=attempt_cap,
                                    compute_thread_init=lambda: pin_thread(self.cores))
        self.direct = DirectPath(self.runtime, BlockingWrites(self.store,
                                                              connect_sync(settings)))
        self.app = make_celery(settings)
        # no_ack: the stream's pending list is the ledger, not Celery's unacked set (a task is
        # never redelivered by Celery), and skipping the transport's ack bookkeeping (two round
        # trips per task) cut the hand-off from 2.1 to 1.4 ms (p50, measured apart).
        self.app.conf.task_queues = [Queue(self.queue, no_ack=True)]  # type: ignore[no-untyped-call]
        self.app.task(name=BATCH_TASK, Request=NoAckRequest)(self._task)
        liveness.install(self.app, self._beat, settings.heartbeat_interval_s,
                         self._beat_aside)

    @property
    def queue(self) -> str:
        return keys.worker_queue(self.spec.name, self.worker_id)

    def _task(self, model: str, batch_id: str, job_ids: list[str], dispatched_ms: float = 0,
              solo: bool = False, entries: list[str] | None = None) -> dict[str, Any]:
        """The Celery task, on the consumer's thread: hand the batch to the loop and return."""
        trace = tracing.received(self.app.current_task.request.__dict__) if tracing.ON else None
        req = BatchRequest(model, batch_id, job_ids, dispatched_ms, solo, trace)
        held = len(self.held)
        self.held.add(batch_id, entries or [])
        self._show_batches()
        try:
            if self.direct.eligible(req, held):
                direct = self.direct.submit(req)
                direct.add_done_callback(lambda done: self._direct_over(req, done))
            else:
                self._on_loop(req)
        except BaseException:  # shutting down: nothing will run it, so nothing may hold it
            self.held.remove(batch_id)
            raise
        return {"batch": batch_id, "jobs": len(job_ids)}

    def _on_loop(self, req: BatchRequest) -> None:
        running = self.loop.spawn(self._run(req))
        running.add_done_callback(lambda done: self._batch_over(req.batch_id, done))

    def _direct_over(self, req: BatchRequest,
                     done: concurrent.futures.Future[DirectResult]) -> None:
        """On the compute thread, after a direct run: hand to the loop what it left undone."""
        try:
            self._after_direct(req, done)
        except BaseException:  # the loop is gone (shutting down): the batch is not held
            self.held.remove(req.batch_id)
            raise

    def _after_direct(self, req: BatchRequest,
                      done: concurrent.futures.Future[DirectResult]) -> None:
        if done.cancelled() or done.exception() is not None:
            # Like the loop's path: the lane is free, the entries go back once unrefreshed.
            self.runtime.lane_free(req.batch_id)
            self.loop.spawn(self.runtime.send_report(BatchReport.ended(req, "error")))
            self._batch_over(req.batch_id, done)
            return
        result = done.result()
        if result.unwritten is not None:
            outcomes, fields = result.unwritten
            writing = self.loop.spawn(self._write_late(outcomes, fields))
            writing.add_done_callback(lambda w: self._batch_over(req.batch_id, w))
        elif not result.done:
            self._on_loop(req)
        else:
            self._batch_over(req.batch_id, done)

    async def _write_late(self, outcomes: list[Outcome], fields: dict[str, str]) -> None:
        await asyncio.wait_for(self.runtime.finish(outcomes, report=fields),
                               self.runtime.outer_limit_s())

    def _batch_over(self, batch_id: str, done: concurrent.futures.Future[Any]) -> None:
        self.held.remove(batch_id)
        self._show_batches()
        if not done.cancelled() and done.exception() is not None:
            log.error("batch failed worker=%s batch=%s error=%r", self.worker_id, batch_id,
                      done.exception())

    def _lane_freed(self, batch_id: str) -> None:
        self.held.lane_freed(batch_id)

    def _show_batches(self) -> None:
        hb = self.heartbeat.hb
        hb.busy = len(self.held)
        hb.batches = self.held.before_lane_free()
        if hb.state in ("ready", "busy"):
            hb.state = "busy" if hb.busy else "ready"

    def _beat(self) -> None:
        """On the Celery consumer's event loop: heartbeat, and keep held entries fresh."""
        if self._side_beat is not None and self.heartbeat.hb.state != "draining":
            # The consumer runs: it beats from now on.
            self._side_beat.cancel()
            self._side_beat = None
        self._show_batches()
        self._watch_direct()
        try:
            self.loop.call(self._beat_async(), timeout_s=self.settings.heartbeat_lapse_s / 2)
        except Exception as exc:  # never let a Redis hiccup stop the consumer loop
            log.warning("heartbeat failed worker=%s error=%r", self.worker_id, exc)

    async def _beat_async(self) -> None:
        await self.heartbeat.publish()
        await self.held.refresh()
        await self.runtime.latencies.flush(self.redis)

    def _watch_direct(self) -> None:
        """Give up on direct batches stuck past their limit (checked at every beat). Like the
        loop's path, it exits even if the predict came back meanwhile: the timeout was
        reported, so the batch's jobs must come back through this death."""
        for req in self.direct.stuck(time.monotonic()):
            self.loop.spawn(self._direct_stuck(req))

    async def _beat_forever(self) -> None:
        """Beats while Celery's consumer does not run: loading the model, and draining (its
        consumer stopped taking batches, the running ones finish)."""
        while True:
            self._watch_direct()
            try:
                await self._beat_async()
            except Exception as exc:
                log.warning("heartbeat failed worker=%s error=%r", self.worker_id, exc)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _run(self, req: BatchRequest) -> dict[str, Any]:
        limit_s = self.spec.options.batch_timeout_s
        try:
            # predict has its own limit; this outer one also bounds a hung preprocess or
            # postprocess and the wait for a lane behind another batch's predict.
            report = await asyncio.wait_for(self.runtime.run_batch(req),
                                            self.runtime.outer_limit_s())
        except BaseException as exc:
            # A timeout was reported to the batcher as one: always exit after it, even if the
            # stuck thread came back meanwhile, so its jobs return through this death.
            if isinstance(exc, TimeoutError | asyncio.CancelledError | BatchTimeout):
                await self._give_up(req, limit_s, "loop")
            raise
        return {"batch": req.batch_id, "ok": report.ok, "failed": report.failed}

    async def _direct_stuck(self, req: BatchRequest) -> None:
        """A direct batch's predict hangs past its limit and grace: report the timeout, as the
        loop's path does, and give up."""
        await self.runtime.send_report(BatchReport.ended(req, "timeout"))
        await self._give_up(req, self.spec.options.batch_timeout_s, "direct")

    async def _give_up(self, req: BatchRequest, limit_s: float, path: str) -> None:
        """A thread is stuck past the time limit: fail a lone suspect job (the hanging item,
        isolated), say goodbye so the batcher reclaims the rest at once, and exit."""
        if req.solo:
            await self.runtime.finish(self.runtime.timeout_outcomes(req))
        log.error("batch stuck past its time limit; exiting for restart worker=%s batch=%s "
                  "limit_s=%s solo=%s path=%s", self.worker_id, req.batch_id, limit_s, req.solo,
                  path)
        try:
            await asyncio.wait_for(self.heartbeat.remove(), 2.0)
        finally:
            os._exit(STUCK_EXIT_CODE)

    def run(self) -> None:
        """Load, then serve until a warm shutdown (SIGTERM: stop taking batches, finish, exit)."""
        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        self._beat_aside()
        try:
            self.heartbeat.hb.torch_uuid = devicecheck.verify(self.device)
            self.runtime.load()
            _set_torch_threads(self.threads)
            self.heartbeat.hb.state = "ready"
            signals.worker_shutting_down.connect(self._on_shutdown, weak=False)
            log.info("worker ready worker=%s device=%s lanes=%d queue=%s", self.worker_id,
                     self.device.label, self.lanes, self.queue)
            self.app.worker_main([
                "worker", "-P", "solo", "-n", self.worker_id, "-Q", self.queue,
                "--without-gossip", "--without-mingle", "--loglevel", self.settings.log_level,
            ])
            self._finish_running()
        finally:
            if self._side_beat is not None:
                self._side_beat.cancel()
            self.loop.call(self.heartbeat.remove(), timeout_s=5)
            self.loop.stop()
            self.direct.writes.close()
            log.info("worker stopped worker=%s", self.worker_id)

    def _finish_running(self) -> None:
        """After Celery's warm shutdown (it takes no more batches): let the batches it handed
        over finish, within their time limits."""
        deadline = time.monotonic() + self.runtime.outer_limit_s()
        while len(self.held) and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(self.held):
            log.error("batches still running at exit worker=%s batches=%d", self.worker_id,
                      len(self.held))

    def _beat_aside(self) -> None:
        """Beat from the I/O loop while Celery's consumer does not run."""
        if self._side_beat is None:
            self._side_beat = self.loop.spawn(self._beat_forever())

    def _on_shutdown(self, **_: Any) -> None:
        self.heartbeat.hb.state = "draining"
        self._beat_aside()
        log.info("worker draining worker=%s busy=%d", self.worker_id, len(self.held))


def _set_torch_threads(n: int) -> None:
    # Only if the model imported torch: importing it here would cost a model without torch a
    # second of start-up. OMP_NUM_THREADS, set before the load, already sized torch's pool.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def main(settings: Settings, model: str, index: int) -> None:
    specs = load_specs(settings.models)
    Worker(settings, specs[model], index).run()
