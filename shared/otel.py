"""The OpenTelemetry side of `shared.tracing`: imported only when tracing is on (it needs the
optional extra `asyncinfer[otel]`). Spans whose times are known only afterwards (a job's wait in
the queue, the stages of a batch) are recorded with explicit start and end times, so the hot
path does no tracing work while a batch runs.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared.tracing import JOBS_HEADER

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer = trace.get_tracer("asyncinfer")
_provider: TracerProvider | None = None
_exporters: list[str] = []
# job / batch ids of what this task works on, for the log lines it writes
LOG_IDS: contextvars.ContextVar[str] = contextvars.ContextVar("asyncinfer_log_ids", default="")


def _exporter() -> list[SpanExporter]:
    names = [e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
             if e.strip()] or ["otlp"]
    out: list[SpanExporter] = []
    for name in names:
        if name == "console":
            out.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                                      os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                     "http/protobuf"))
            if protocol == "grpc":
                try:
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                        OTLPSpanExporter as GrpcExporter,
                    )
                except ImportError:
                    log.warning("OTLP over gRPC needs opentelemetry-exporter-otlp-proto-grpc; "
                                "exporting over HTTP/protobuf")
                else:
                    out.append(GrpcExporter())
                    continue
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())  # endpoint, headers, timeout: from OTEL_* variables
        elif name != "none":
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored", name)
        _exporters.append(name)
    return out


def configure(role: str) -> None:
    """A tracer provider for this process (service `asyncinfer-<role>` unless OTEL_SERVICE_NAME
    or OTEL_RESOURCE_ATTRIBUTES name it), sampling as OTEL_TRACES_SAMPLER says (default: follow
    the caller's decision, else sample), batch export."""
    global _provider, _tracer
    attrs: dict[str, Any] = {"asyncinfer.role": role}
    if not os.environ.get("OTEL_SERVICE_NAME") and \
            "service.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = f"asyncinfer-{role}"
    _provider = TracerProvider(resource=Resource.create(attrs))
    for exporter in _exporter():
        _provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer("asyncinfer")
    _install_log_ids()


def describe() -> str:
    return ",".join(_exporters)


class _LogIds(logging.Filter):
    """Appends the current trace and span ids, and the job or batch ids of the task, to each log
    line (once per record, whatever the number of handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "asyncinfer_ids", False):
            return True
        record.asyncinfer_ids = True
        extra = []
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            extra.append(f"trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}")
        ids = LOG_IDS.get()
        if ids:
            extra.append(ids)
        if extra:
            record.msg = f"{record.msg} {' '.join(extra)}"
        return True


def _install_log_ids() -> None:
    ids = _LogIds()
    for handler in logging.getLogger().handlers:
        handler.addFilter(ids)


def traceparent(span: trace.Span) -> str:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def _parent(tp: str) -> context.Context:
    return _PROPAGATOR.extract({"traceparent": tp})


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


class SubmitTrace:
    """The gateway's server span of one submit; current while the request is handled."""

    def __init__(self, headers: Mapping[str, str], model: str) -> None:
        self.span = _tracer.start_span(
            "asyncinfer.submit", context=_PROPAGATOR.extract(headers), kind=SpanKind.SERVER,
            attributes={"asyncinfer.model": model, "http.request.method": "POST"})
        sampled = self.span.get_span_context().trace_flags.sampled
        # Only a sampled job carries a context downstream: the others cost nothing further.
        self.traceparent = traceparent(self.span) if sampled else ""
        self._token: contextvars.Token[context.Context] | None = None

    def __enter__(self) -> SubmitTrace:
        self._token = context.attach(trace.set_span_in_context(self.span))
        return self

    def jobs(self, ids: list[str]) -> None:
        self.span.set_attribute("asyncinfer.job_ids", ids)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            status = int(getattr(exc, "status", 500))
            self.span.set_attribute("http.response.status_code", status)
            self.span.set_attribute("error.type", type(exc).__name__)
            if status >= 500:  # a client's error is not the server's
                self.span.record_exception(exc)
                self.span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
        if self._token is not None:
            context.detach(self._token)
        self.span.end()


class DispatchTrace:
    """The batcher's spans of one dispatch: each traced job's wait in the queue (ended now), and
    the batch's producer span, whose context and the waits' go in the Celery headers."""

    def __init__(self, model: str, batch_id: str, worker: str,
                 jobs: list[tuple[str, str, int]]) -> None:
        now = time.time_ns()
        waits: dict[str, str] = {}
        links: list[Link] = []
        first: trace.Span | None = None
        for job_id, tp, submitted_ms in jobs:
            wait = _tracer.start_span(
                "asyncinfer.queue_wait", context=_parent(tp), start_time=submitted_ms * 1_000_000,
                attributes={"asyncinfer.model": model, "asyncinfer.job_id": job_id,
                            "asyncinfer.batch_id": batch_id})
            wait.end(end_time=max(now, submitted_ms * 1_000_000))
            waits[job_id] = traceparent(wait)
            links.append(Link(wait.get_span_context(), {"asyncinfer.job_id": job_id}))
            first = first or wait
        assert first is not None
        self.span = _tracer.start_span(
            "asyncinfer.dispatch", context=trace.set_span_in_context(first),
            kind=SpanKind.PRODUCER, links=links, start_time=now, attributes={
                "messaging.system": "celery", "messaging.operation.type": "send",
                "messaging.batch.message_count": len(jobs), "asyncinfer.model": model,
                "asyncinfer.batch_id": batch_id, "asyncinfer.worker": worker})
        self.headers: dict[str, Any] = {"traceparent": traceparent(self.span),
                                        JOBS_HEADER: waits}

    def end(self, held: int | None, error: BaseException | None = None) -> None:
        if held is not None:
            self.span.set_attribute("asyncinfer.sent_jobs", held)
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        self.span.end()


class BatchTrace:
    """The worker's spans of one batch: the consumer span (from receipt to the last final
    write) and, per traced job, a job span with its batch's stages under it."""

    def __init__(self, headers: Mapping[str, Any]) -> None:
        self.jobs: dict[str, context.Context] = {
            job_id: _parent(tp) for job_id, tp in dict(headers[JOBS_HEADER]).items()}
        links = [Link(trace.get_current_span(ctx).get_span_context(), {"asyncinfer.job_id": j})
                 for j, ctx in self.jobs.items()]
        self.span = _tracer.start_span(
            "asyncinfer.batch", context=_PROPAGATOR.extract(dict(headers)),
            kind=SpanKind.CONSUMER, links=links, attributes={
                "messaging.system": "celery", "messaging.operation.type": "process",
                "messaging.batch.message_count": len(self.jobs)})
        self.ended = False

    def started(self, model: str, batch_id: str, worker: str) -> None:
        """In the task that runs the batch: its log lines carry the trace and the ids."""
        self.span.set_attributes({"asyncinfer.model": model, "asyncinfer.batch_id": batch_id,
                                  "asyncinfer.worker": worker})
        context.attach(trace.set_span_in_context(self.span))
        LOG_IDS.set(f"batch={batch_id} jobs={','.join(self.jobs)}")

    def finished(self, stages: Mapping[str, list[list[float]]], started_mono: float,
                 errors: Mapping[str, dict[str, str] | None], outcome: str = "ok") -> None:
        """After the final writes: the stages (monotonic [start, end] intervals) as spans."""
        if self.ended:
            return
        self.ended = True
        offset = time.time_ns() - time.monotonic_ns()

        def ns(mono: float) -> int:
            return int(mono * 1e9) + offset

        batch_ctx = trace.set_span_in_context(self.span)
        for start, end in stages.get("predict", []):
            _tracer.start_span("predict", context=batch_ctx, start_time=ns(start)).end(ns(end))
        now = time.time_ns()
        for job_id, error in errors.items():
            parent = self.jobs.get(job_id)
            if parent is None:
                continue
            job = _tracer.start_span("asyncinfer.job", context=parent, start_time=ns(started_mono),
                                     links=[Link(self.span.get_span_context())],
                                     attributes={"asyncinfer.job_id": job_id})
            job_ctx = trace.set_span_in_context(job)
            for stage in ("preprocess", "predict", "postprocess"):
                for start, end in stages.get(stage, []):
                    _tracer.start_span(stage, context=job_ctx, start_time=ns(start)).end(ns(end))
            if error is not None:
                job.set_attribute("error.type", error.get("type", "error"))
                job.set_status(Status(StatusCode.ERROR, error.get("message", "")[:200]))
            job.end(end_time=now)
        if outcome != "ok":
            self.span.set_status(Status(StatusCode.ERROR, outcome))
        self.span.set_attribute("asyncinfer.outcome", outcome)
        self.span.end(end_time=now)
