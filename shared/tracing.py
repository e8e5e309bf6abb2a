"""OpenTelemetry tracing of jobs across the gateway, the batcher and the workers: the hooks
the hot path calls, which cost one flag check while tracing is off.

Off unless the standard variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER=otlp|console`, and not
`OTEL_SDK_DISABLED=true` / `OTEL_TRACES_EXPORTER=none`. Each entry point calls `setup` once;
only then, and only if asked, is OpenTelemetry's SDK imported (`shared.otel`, the optional extra
`asyncinfer[otel]`). Sampling, resource attributes and the exporter's endpoint, headers and
protocol follow the other OTEL_* variables as the SDK reads them.

What one job's trace holds (docs/tracing.md):
- gateway: `asyncinfer.submit` (server span; child of the request's W3C `traceparent`);
- batcher: `asyncinfer.queue_wait` (submit to dispatch; child of the submit span), and per
  batch `asyncinfer.dispatch` (producer span; child of its first traced job's wait, linked to
  every traced job's wait);
- worker: `asyncinfer.batch` (consumer span; child of the dispatch, linked to the jobs), and
  per job `asyncinfer.job` (child of the job's wait) with `preprocess`, `predict`,
  `postprocess` under it.
The context travels in the stream entry (`tp`: the submit span's traceparent) and in the
Celery message's headers (`traceparent` of the dispatch, and each job's wait).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.otel import BatchTrace, DispatchTrace, SubmitTrace

log = logging.getLogger(__name__)

ON = False  # set once by `setup`; every hook is behind `if tracing.ON`
ENTRY_FIELD = "tp"  # the stream entry's field with the submit span's traceparent
JOBS_HEADER = "asyncinfer_job_traces"  # Celery header: job id -> traceparent of its wait
_impl: Any = None  # shared.otel, once set up


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard OTEL_* variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",")
                 if e.strip()}
    if exporters == {"none"}:
        return False
    return bool(exporters) or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                   or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(role: str) -> bool:
    """Turn tracing on for this process (`role`: gateway, batcher, worker) if the environment
    asks for it; returns whether it is on. Call once, from the entry point."""
    global ON, _impl
    if ON or not wanted():
        return ON
    try:
        from shared import otel
    except ImportError as exc:
        log.warning("tracing asked for by OTEL_* but OpenTelemetry is not installed "
                    "(pip install 'asyncinfer[otel]'): %s", exc)
        return False
    otel.configure(role)
    _impl, ON = otel, True
    log.info("tracing on role=%s exporter=%s", role, otel.describe())
    return True


def submit(headers: Mapping[str, str], model: str) -> SubmitTrace:
    """The gateway's span of one submit request (a context manager); only when ON."""
    span: SubmitTrace = _impl.SubmitTrace(headers, model)
    return span


def dispatch(model: str, batch_id: str, worker: str, jobs: list[tuple[str, str, int]]
             ) -> DispatchTrace | None:
    """The batcher's spans of one dispatch; `jobs`: (job id, entry traceparent, submit epoch
    ms) of the batch's jobs. None when none of them is traced. Only when ON."""
    traced = [j for j in jobs if j[1]]
    if not traced:
        return None
    out: DispatchTrace = _impl.DispatchTrace(model, batch_id, worker, traced)
    return out


def received(headers: Mapping[str, Any]) -> BatchTrace | None:
    """The worker's trace of one batch from its Celery message headers; None when the batch
    carries no traced job. Only when ON."""
    if not headers.get(JOBS_HEADER):
        return None
    out: BatchTrace = _impl.BatchTrace(headers)
    return out
