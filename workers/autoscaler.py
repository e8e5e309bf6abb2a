"""`python -m workers.autoscaler`: keeps each model's worker count matched to its load.

Reads the signals from Redis (stream backlog, in-flight entries, every host's heartbeats and
worker claims), asks the scaling policy per model, and acts through the local launcher, which
owns this host's devices. With autoscalers on several hosts, the claims (workers.claims) keep
them all within one desired count per model. It publishes its launcher's state per model (for
GET /v1/models/{m}) and its own heartbeat. Stopping it drains and stops every worker it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import eventloop, expiring, keys
from shared.devices import parse_devices
from shared.heartbeats import SERVING_STATES, live_workers
from shared.logs import configure_logging
from shared.modelspec import ModelSpec, load_specs
from shared.redisconn import connect
from shared.settings import Settings
from shared.store import JobStore
from workers.claims import Claims
from workers.launcher import LocalLauncher, WorkerProc
from workers.scaling import ScaleConfig, ScaleDecision, ScaleInputs, ScalingPolicy

log = logging.getLogger(__name__)
INTERVAL_S = 0.5
# No max_workers: the devices (of every host) are the only ceiling.
UNBOUNDED = sys.maxsize


class Autoscaler:
    def __init__(self, settings: Settings, specs: dict[str, ModelSpec], redis: aioredis.Redis,
                 launcher: LocalLauncher) -> None:
        self.specs = specs
        self.redis = redis
        self.store = JobStore(redis, result_ttl_s=settings.result_ttl_s,
                              job_ttl_s=settings.job_ttl_s)
        self.launcher = launcher
        self.claims = Claims(redis)
        self.id = f"{launcher.host}:{os.getpid()}"
        # Counts are cluster-wide (every host's workers): this host's devices limit only what
        # it adds, through free_devices.
        self.policies = {
            name: ScalingPolicy(ScaleConfig(
                concurrency_target=s.options.concurrency_target,
                min_workers=s.options.min_workers,
                max_workers=s.options.max_workers or UNBOUNDED,
                scale_down_delay_s=s.options.scale_down_delay_s), time.monotonic)
            for name, s in specs.items()}
        self._last: dict[str, tuple[int, str]] = {}

    async def step(self) -> None:
        """One pass over every model: read, decide, act, publish."""
        for gone in self.launcher.reap():
            await self.claims.release(gone.model, gone.name)
        for name in self.specs:
            await self._model_step(name)
        await expiring.put(self.redis, keys.autoscalers(), self.id, {
            "id": self.id, "host": self.launcher.host, "pid": os.getpid(),
            "devices": [d.label for d in self.launcher.devices],
            "workers": sorted(self.launcher.workers)})

    async def _model_step(self, model: str) -> None:
        per_device = self.specs[model].options.workers_per_device
        queued, in_flight = await self.store.backlog(model)
        # By the name the launcher gave (a worker's own identity adds a token per start).
        beats = {str(b.get("base") or b["name"]): b for b in await live_workers(self.redis, model)}
        serving = {n for n, b in beats.items() if b["state"] in SERVING_STATES}
        mine = self.launcher.of(model)
        for w in mine:
            if w.name in serving:
                self.launcher.mark_up(w)
        claimed = await self.claims.refresh(model, [w.name for w in mine if not w.draining],
                                            [w.name for w in mine if w.draining])
        # Workers started by hand serve without a claim: the claims may fill only the rest.
        unclaimed = len(serving - set(claimed))
        policy = self.policies[model]
        decision = policy.decide(ScaleInputs(
            queued=queued, in_flight=in_flight, live=len(serving),
            # Claimed but not serving yet, on any host: capacity on its way.
            starting=sum(1 for n in claimed if n not in serving),
            free_devices=self.launcher.room(model, per_device)))
        await self._record(model, decision)
        if decision.action == "up":
            for _ in range(decision.delta):
                plan = self.launcher.plan(model, per_device)
                if plan is None or not await self.claims.claim(
                        model, plan.name, max(0, decision.desired - unclaimed)):
                    break  # no device left here, or other hosts took the slots
                self.launcher.start(plan)
        elif decision.action == "down":
            busy = {n for n, b in beats.items() if int(b.get("busy", 0))}
            worker = self.launcher.drain_candidate(model, busy)
            if worker is not None and await self.claims.release_above(
                    model, worker.name, max(0, decision.desired - unclaimed)):
                self.launcher.drain(worker)
        await expiring.put(self.redis, keys.launch_state(model), self.id, {
            "autoscaler": self.id, "host": self.launcher.host,
            **self.launcher.state(model)})

    async def _record(self, model: str, d: ScaleDecision) -> None:
        """Log and keep a decision once: when it acts or its target changes, not every pass."""
        key = (d.desired, d.action)
        if d.action == "hold" and self._last.get(model) == key:
            return
        self._last[model] = key
        log.info("scale decision model=%s action=%s desired=%d queued=%d in_flight=%d live=%d "
                 "starting=%d reason=%r", model, d.action, d.desired, d.inputs.queued,
                 d.inputs.in_flight, d.inputs.live, d.inputs.starting, d.reason)
        entry = json.dumps({**d.as_dict(), "at_ms": int(time.time() * 1000)})
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(keys.scale_history(model), entry)
        pipe.ltrim(keys.scale_history(model), 0, keys.SCALE_HISTORY_LEN - 1)
        await pipe.execute()

    async def close(self, workers: list[WorkerProc]) -> None:
        """Give back this autoscaler's claims and entries (best effort: they expire anyway)."""
        with contextlib.suppress(RedisError, OSError):
            for w in workers:
                await self.claims.release(w.model, w.name)
            for model in self.specs:
                await self.redis.hdel(keys.launch_state(model), self.id)
            await self.redis.hdel(keys.autoscalers(), self.id)


async def serve(settings: Settings, log_dir: Path | None = None) -> None:
    """Scale until SIGTERM/SIGINT, then drain and stop every worker."""
    specs = load_specs(settings.models)
    launcher = LocalLauncher(parse_devices(settings.devices), log_dir,
                             env={"ASYNCINFER_REDIS_URL": settings.redis_url},
                             torch_threads=settings.torch_threads)
    redis = connect(settings)
    scaler = Autoscaler(settings, specs, redis, launcher)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("autoscaler started id=%s models=%s devices=%s", scaler.id, ",".join(specs),
             ",".join(d.label for d in launcher.devices))
    failing = False
    try:
        while not stop.is_set():
            try:
                await scaler.step()
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("autoscaler cannot reach Redis error=%s", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), INTERVAL_S)
    finally:
        workers = list(launcher.workers.values())
        log.info("autoscaler stopping workers=%d", len(workers))
        await asyncio.to_thread(launcher.stop_all)
        await scaler.close(workers)
        await redis.aclose()
        log.info("autoscaler stopped")


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    log_dir = Path(settings.log_dir) if settings.log_dir else None
    eventloop.run(serve(settings, log_dir))


if __name__ == "__main__":
    main()
