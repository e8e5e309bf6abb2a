"""`python -m workers.autoscaler`: keeps each model's worker count matched to its load.

Reads the signals from Redis (stream backlog, in-flight entries, heartbeats), asks the scaling
policy per model, and acts through the local launcher. Stopping it drains and stops every
worker it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.devices import parse_devices
from shared.heartbeats import SERVING_STATES, live_workers
from shared.logs import configure_logging
from shared.modelspec import ModelSpec, load_specs
from shared.redisconn import connect
from shared.settings import Settings
from shared.store import JobStore
from workers.launcher import LocalLauncher
from workers.scaling import ScaleConfig, ScaleDecision, ScaleInputs, ScalingPolicy

log = logging.getLogger(__name__)
INTERVAL_S = 0.5


class Autoscaler:
    def __init__(self, settings: Settings, specs: dict[str, ModelSpec], redis: aioredis.Redis,
                 launcher: LocalLauncher) -> None:
        self.specs = specs
        self.redis = redis
        self.store = JobStore(redis, result_ttl_s=settings.result_ttl_s,
                              job_ttl_s=settings.job_ttl_s)
        self.launcher = launcher
        n_devices = len(launcher.devices)
        self.policies = {
            name: ScalingPolicy(ScaleConfig(
                concurrency_target=s.options.concurrency_target,
                min_workers=min(s.options.min_workers, n_devices),
                max_workers=min(s.options.max_workers or n_devices, n_devices),
                scale_down_delay_s=s.options.scale_down_delay_s), time.monotonic)
            for name, s in specs.items()}
        self._last: dict[str, tuple[int, str]] = {}

    async def step(self) -> None:
        """One pass over every model: read, decide, act."""
        for crashed in self.launcher.reap():
            log.info("worker restarted model=%s index=%d restarts=%d", crashed.model,
                     crashed.index, crashed.restarts)
        for name in self.specs:
            await self._model_step(name)

    async def _model_step(self, model: str) -> None:
        queued, in_flight = await self.store.backlog(model)
        beats = {int(b["index"]): b for b in await live_workers(self.redis, model)}
        mine = [w for w in self.launcher.of(model) if not w.draining]
        serving = {i for i, b in beats.items() if b["state"] in SERVING_STATES}
        starting = sum(1 for w in mine if w.index not in serving)
        # Serving workers on other hosts count as capacity too.
        live = len(serving)
        policy = self.policies[model]
        decision = policy.decide(ScaleInputs(
            queued=queued, in_flight=in_flight, live=live, starting=starting,
            free_devices=self.launcher.free_devices(model, policy.config.max_workers)))
        await self._record(model, decision)
        if decision.action == "up":
            for _ in range(decision.delta):
                self.launcher.start(model)
        elif decision.action == "down":
            busy = {i for i, b in beats.items() if int(b.get("busy", 0))}
            self.launcher.drain_one(model, busy)

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


async def serve(settings: Settings, log_dir: Path | None = None) -> None:
    """Scale until SIGTERM/SIGINT, then drain and stop every worker."""
    specs = load_specs(settings.models)
    launcher = LocalLauncher(parse_devices(settings.devices), log_dir,
                             env={"ASYNCINFER_REDIS_URL": settings.redis_url})
    redis = connect(settings)
    scaler = Autoscaler(settings, specs, redis, launcher)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("autoscaler started models=%s devices=%d", ",".join(specs), len(launcher.devices))
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
        log.info("autoscaler stopping workers=%d", len(launcher.workers))
        await asyncio.to_thread(launcher.stop_all)
        await redis.aclose()
        log.info("autoscaler stopped")


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level)
    log_dir = Path(settings.log_dir) if settings.log_dir else None
    asyncio.run(serve(settings, log_dir))


if __name__ == "__main__":
    main()
