"""The FastAPI application: the HTTP contract of DESIGN §7."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic_core import to_json
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import events as sse
from gateway import inputs
from gateway.auth import ApiKeys
from gateway.metrics import GatewayMetrics
from gateway.middleware import GatewayMiddleware, owner_of
from gateway.openapi import document_routes
from gateway.schedule import Schedule, eta_of
from gateway.views import model_info
from gateway.waiters import CompletionWaiters
from gateway.webhook_targets import TargetPolicy
from gateway.webhooks import READ_BLOCK_S, WebhookDeliverer
from shared import tracing
from shared.answerleg import AnswerLegs
from shared.errors import AsyncInferError, InvalidInput, NotFound, QueueFull, Unavailable
from shared.jobs import FINAL_STATUSES, Job, JobMetrics, iso, new_job_id
from shared.modelspec import ModelSpec, load_specs
from shared.redisconn import connect, connect_mux
from shared.settings import Settings
from shared.store import JobStore, body_hash

log = logging.getLogger(__name__)


@dataclass
class Deps:
    settings: Settings
    specs: dict[str, ModelSpec]
    store: JobStore
    waiters: CompletionWaiters
    keys: ApiKeys
    metrics: GatewayMetrics
    targets: TargetPolicy
    schedule: Schedule


def create_app(settings: Settings, specs: dict[str, ModelSpec] | None = None,
               targets: TargetPolicy | None = None, *, server_id: str | None = None,
               metrics_dir: str | None = None) -> FastAPI:
    """Build the app; Redis connections open in its lifespan. `targets` is the webhook address
    policy (default: from the settings). `server_id` and `metrics_dir` are set for one of
    several processes serving one port (gateway.__main__): the /metrics they share."""
    specs = specs if specs is not None else load_specs(settings.models)
    targets = targets or TargetPolicy(settings.webhook_allow)
    keys = ApiKeys(settings.api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings)
        mux = connect_mux(settings)
        store = JobStore(redis, result_ttl_s=settings.result_ttl_s, job_ttl_s=settings.job_ttl_s,
                         idempotency_ttl_s=settings.idempotency_ttl_s,
                         max_attempts=settings.max_attempts, mux=mux)
        webhooks = WebhookDeliverer(connect(settings, block_s=READ_BLOCK_S), settings, targets)
        webhooks.start()
        legs = AnswerLegs(redis)
        legs.start()
        waiters = CompletionWaiters(connect(settings, block_s=3600), legs)
        waiters.start()
        metrics = GatewayMetrics(redis, specs, server_id=server_id, shared_dir=metrics_dir)
        app.state.deps = Deps(settings, specs, store, waiters, keys, metrics, targets,
                              Schedule(redis, specs))
        log.info("gateway started models=%s auth=%s webhooks=%s fault_injection=%s",
                 ",".join(specs), keys.enabled, bool(settings.webhook_secret.strip()),
                 settings.fault_injection)
        if store.idempotency_ttl_ms < settings.idempotency_ttl_s * 1000:
            log.warning("idempotency keys live %d s, not idempotency_ttl_s=%d: no longer than "
                        "the jobs they name (result_ttl_s)", store.idempotency_ttl_ms // 1000,
                        settings.idempotency_ttl_s)
        yield
        if server_id is None:  # else the lease is its server's (gateway.servers) to give up
            with contextlib.suppress(RedisError, OSError):
                await metrics.release()
        await waiters.stop()
        await legs.stop()
        await webhooks.stop()
        await mux.aclose()
        await redis.aclose()

    # FastAPI's built-in OpenTelemetry hooks are off: /metrics is the system's telemetry, and
    # the per-request check for a tracer cost CPU on every request.
    app = FastAPI(title="asyncinfer", version="0.1.0", lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.add_middleware(GatewayMiddleware, keys=keys, max_body_bytes=settings.max_body_bytes)
    document_routes(app, specs, settings, keys.enabled)

    @app.exception_handler(AsyncInferError)
    async def _ours(_: Request, exc: AsyncInferError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        err = Unavailable(f"Redis is unreachable: {type(exc).__name__}")
        return JSONResponse(err.body(), status_code=err.status, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing errors (no such path, wrong method) in the contract's error shape too.
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route matching the path
            headers["Allow"] = ", ".join(_allowed(request.url.path))
        return JSONResponse({"error": {"type": kind, "message": str(exc.detail)}},
                            status_code=exc.status_code, headers=headers)

    def _allowed(path: str) -> list[str]:
        methods: set[str] = set()
        for route in app.routes:
            regex, route_methods = getattr(route, "path_regex", None), getattr(
                route, "methods", None)
            if regex is not None and route_methods and regex.match(path):
                methods |= route_methods
        return sorted(methods)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"])
        err = InvalidInput(f"{field}: {first['msg']}", field=field)
        return JSONResponse(err.body(), status_code=err.status)

    def deps(request: Request) -> Deps:
        d: Deps = request.app.state.deps
        return d

    def spec_of(d: Deps, model: str) -> ModelSpec:
        if model not in d.specs:
            raise NotFound(f"no model {model!r}")
        return d.specs[model]

    async def submit(request: Request, model: str,
                     batch: bool) -> tuple[Deps, list[Job], str]:
        """Validate and enqueue; returns the deps, the jobs and the caller's owner id."""
        if not tracing.ON:
            return await _submit(request, model, batch)
        with tracing.submit(request.headers, model) as span:
            out = await _submit(request, model, batch, span.traceparent)
            span.jobs([j.id for j in out[1]])
            return out

    async def _submit(request: Request, model: str, batch: bool,
                      traceparent: str = "") -> tuple[Deps, list[Job], str]:
        d = deps(request)
        owner = owner_of(request)
        spec = spec_of(d, model)
        started = time.monotonic()
        raw = await inputs.read_body(request, d.settings.max_body_bytes)
        body = inputs.parse_json(raw)
        if batch:
            env = inputs.envelope(body, inputs.BatchBody)
            items: list[tuple[tuple[str | int, ...], Any]] = [
                (("inputs", i), v) for i, v in enumerate(env.inputs)]
        else:
            env = inputs.envelope(body, inputs.SubmitBody)
            items = [(("input",), env.input)]
        jobs = inputs.new_jobs(spec, items, env, d.settings.fault_injection)
        if env.webhook is not None:
            if not d.settings.webhook_secret.strip():
                raise InvalidInput("webhook: webhooks are off in this deployment (no "
                                   "ASYNCINFER_WEBHOOK_SECRET)", field="webhook")
            await d.targets.check_url(env.webhook)
        idem = request.headers.get("idempotency-key")
        ids = [new_job_id() for _ in jobs]
        d.waiters.note_submitted(ids)
        o = spec.options
        try:
            done = await d.store.submit(
                model, jobs, owner=owner, ids=ids, max_queue=o.max_queue,
                max_queue_per_key=(o.max_queue_per_key or max(1, o.max_queue // 2))
                if owner else 0,
                idempotency_key=idem, request_hash=body_hash(raw) if idem else "",
                max_latency_ms=o.max_latency_ms,
                max_ahead=await d.schedule.limits(model, jobs), traceparent=traceparent)
        except QueueFull as exc:
            raise await _queue_full(d, model, exc) from None
        if done.unmeetable is not None:
            index, position = done.unmeetable
            raise await d.schedule.refuse(model, jobs[index], position)
        d.metrics.submitted(model, len(jobs), time.monotonic() - started)
        if done.replay:
            return d, await d.store.get_many(done.ids, owner), owner
        created = iso(done.created_ms) or ""
        positions: list[int | None] = (list(done.positions) if done.positions
                                       else [None] * len(done.ids))
        drain = await d.schedule.drain(model) if done.positions else None
        out = []
        for job_id, job, ahead in zip(done.ids, jobs, positions, strict=True):
            deadline: int | None = (None if job.deadline_ms is None
                                    else done.created_ms + job.deadline_ms)
            eta = None if ahead is None else eta_of(drain, ahead, job.rows)
            out.append(Job(id=job_id, model=model, status="queued", priority=env.priority,
                           created_at=created, deadline_at=iso(deadline), eta=eta,
                           metrics=JobMetrics()))
        return d, out, owner

    async def _queue_full(d: Deps, model: str, exc: QueueFull) -> QueueFull:
        """429 whose Retry-After is the time the backlog (the model's, or the API key's share
        of it) needs to drain to half its limit at the current rate."""
        rate = await d.schedule.drain_rows_per_s(model)
        depth, limit = int(exc.detail["queue_depth"]), int(exc.detail["limit"])
        excess = max(1, depth - limit // 2)
        retry = 5 if rate <= 0 else min(300, max(1, math.ceil(excess / rate)))
        return QueueFull(exc.message, retry_after_s=retry, queue_depth=depth, limit=limit,
                         scope=exc.detail["scope"])

    def job_response(job: Job, status: int, located: bool = False) -> Response:
        return Response(to_json(job.public()), status_code=status, media_type="application/json",
                        headers={"Location": f"/v1/jobs/{job.id}"} if located else None)

    async def submit_one(request: Request) -> Response:
        d, jobs, owner = await submit(request, request.path_params["model"], batch=False)
        job = jobs[0]
        wait_s = inputs.prefer_wait_s(request.headers.get("prefer"), d.settings.max_wait_s)
        if wait_s > 0 and job.status not in FINAL_STATUSES:
            job = await d.waiters.wait(job.id, lambda: d.store.get(job.id, owner), wait_s,
                                       lambda f: JobStore.visible(job.id, f, owner))
            job = await d.schedule.with_eta(d.store, job)
        return job_response(job, 200 if job.status in FINAL_STATUSES else 202, located=True)

    @app.post("/v1/models/{model}/jobs:batch", status_code=202, include_in_schema=False)
    async def submit_batch(model: str, request: Request) -> JSONResponse:
        _, jobs, _ = await submit(request, model, batch=True)
        return JSONResponse({"jobs": [j.public() for j in jobs]}, status_code=202)

    async def get_job(request: Request) -> Response:
        d = deps(request)
        owner = owner_of(request)
        job_id: str = request.path_params["job_id"]
        wait = inputs.query_wait_s(request.query_params.get("wait"), d.settings.max_wait_s)
        if wait > 0:
            job = await d.waiters.wait(job_id, lambda: d.store.get(job_id, owner), wait,
                                       lambda f: JobStore.visible(job_id, f, owner))
        else:
            job = await d.store.get(job_id, owner)
        return job_response(await d.schedule.with_eta(d.store, job), 200)

    # The two routes every job takes are plain Starlette routes: FastAPI's per-request
    # parameter solving cost about 30 µs of the ~50 µs its routing took per request
    # (bench/profile_hotpath.py); they parse their few parameters themselves and are documented
    # in the OpenAPI schema by hand (gateway/openapi.py).
    app.add_route("/v1/models/{model}/jobs", submit_one, methods=["POST"])
    app.add_route("/v1/jobs/{job_id}", get_job, methods=["GET"])

    # Documented in gateway/openapi.py with the other job routes.
    @app.get("/v1/jobs/{job_id}/events", operation_id="job_events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        d = deps(request)
        owner = owner_of(request)
        after = sse.parse_last_event_id(request.headers.get("last-event-id"))
        stream = await sse.open_events(d.store, d.waiters, job_id, owner, after,
                                       lambda j: d.schedule.with_eta(d.store, j))

        async def bounded() -> Any:
            # One connection lives at most max_wait_s: the client reconnects with its
            # Last-Event-ID (EventSource does by itself).
            try:
                async with asyncio.timeout(d.settings.max_wait_s):
                    async for chunk in stream:
                        yield chunk
            except TimeoutError:
                return
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(bounded(), media_type=sse.MEDIA_TYPE,
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.delete("/v1/jobs/{job_id}", operation_id="cancel_job")
    async def cancel_job(job_id: str, request: Request) -> Response:
        d = deps(request)
        return job_response(await d.store.cancel(job_id, owner_of(request)), 200)

    @app.get("/v1/models", operation_id="list_models")
    async def list_models(request: Request) -> dict[str, Any]:
        d = deps(request)
        faults = d.settings.fault_injection
        return {"models": [await model_info(d.store.redis, s, faults)
                           for s in d.specs.values()]}

    @app.get("/v1/models/{model}", operation_id="get_model")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        d = deps(request)
        return await model_info(d.store.redis, spec_of(d, model), d.settings.fault_injection)

    @app.get("/healthz", operation_id="healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", operation_id="readyz")
    async def readyz(request: Request) -> JSONResponse:
        try:
            await deps(request).store.redis.ping()
        except (RedisError, OSError) as exc:
            err = Unavailable(f"Redis is unreachable: {type(exc).__name__}")
            return JSONResponse(err.body(), status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", operation_id="metrics")
    async def metrics(request: Request) -> Response:
        text = await deps(request).metrics.render()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
