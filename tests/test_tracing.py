"""OpenTelemetry traces across processes, checked by a real OTLP/HTTP receiver (protobuf): one
job submitted with a W3C traceparent yields spans of that trace from the gateway, the batcher
and the worker processes, each parented or linked as docs/tracing.md says. And with no OTEL_*
variable, tracing is off: no SDK import, nothing in the stream entries."""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis

from shared import keys, tracing
from shared.procs import free_port
from shared.settings import Settings
from tests.conftest import Procs, wait_until, workers_ready

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: decodes each export into flat span dicts."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        assert self.path == "/v1/traces"
        req = trace_service_pb2.ExportTraceServiceRequest()
        req.ParseFromString(body)
        found = []
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    found.append({
                        "service": attrs.get("service.name"), "name": s.name,
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(), "kind": s.kind,
                        "links": [(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                        "attrs": {a.key: a.value for a in s.attributes},
                        "start": s.start_time_unix_nano, "end": s.end_time_unix_nano})
        with self.server.lock:
            self.server.spans += found
        out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
async def test_one_job_is_one_trace_across_gateway_batcher_and_worker(
        procs: Procs, settings: Settings, receiver: Receiver) -> None:
    # The standard variables only; the export delay is the SDK's knob (default 5 s).
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    procs.start("batcher", "batcher", **otel)
    procs.start("worker-synthetic-1", "workers", "--model", "synthetic", "--index", "1",
                WORKER_INDEX="1", **otel)
    url = procs.gateway(**otel)
    wait_until(workers_ready(settings, "synthetic", 1), 60, "synthetic worker ready")
    trace_id, caller = os.urandom(16).hex(), os.urandom(8).hex()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 4}}, headers={
            "traceparent": f"00-{trace_id}-{caller}-01", "Prefer": "wait=20"})
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    job_id = r.json()["id"]
    wanted = {"asyncinfer.submit", "asyncinfer.queue_wait", "asyncinfer.dispatch",
              "asyncinfer.batch", "asyncinfer.job", "preprocess", "postprocess"}
    wait_until(lambda: wanted <= {s["name"] for s in receiver.of_trace(trace_id)}, 20,
               f"spans of trace {trace_id}: {sorted({s['name'] for s in receiver.spans})}")
    time.sleep(0.3)  # stragglers of the same export round
    spans = receiver.of_trace(trace_id)
    one = {s["name"]: s for s in spans if s["name"] != "predict"}

    submit, wait, dispatch = one["asyncinfer.submit"], one["asyncinfer.queue_wait"], \
        one["asyncinfer.dispatch"]
    batch, job = one["asyncinfer.batch"], one["asyncinfer.job"]
    # Three processes, one trace.
    assert submit["service"] == "asyncinfer-gateway"
    assert wait["service"] == dispatch["service"] == "asyncinfer-batcher"
    assert {batch["service"], job["service"], one["preprocess"]["service"]} == {
        "asyncinfer-worker"}
    # Parents: the caller's span -> submit -> wait -> dispatch -> batch; wait -> job -> stages.
    assert submit["parent"] == caller
    assert wait["parent"] == submit["span_id"]
    assert dispatch["parent"] == wait["span_id"]
    assert batch["parent"] == dispatch["span_id"]
    assert job["parent"] == wait["span_id"]
    stages = [s for s in spans if s["name"] in ("preprocess", "predict", "postprocess")
              and s["parent"] == job["span_id"]]
    assert sorted(s["name"] for s in stages) == ["postprocess", "predict", "preprocess"]
    assert any(s["name"] == "predict" and s["parent"] == batch["span_id"] for s in spans)
    # Links: the batch spans name the waits of their jobs; the job its batch.
    assert (trace_id, wait["span_id"]) in dispatch["links"]
    assert (trace_id, wait["span_id"]) in batch["links"]
    assert (trace_id, batch["span_id"]) in job["links"]
    assert job["attrs"]["asyncinfer.job_id"].string_value == job_id
    # Times nest: the wait starts at submit and ends at dispatch; the job runs after it.
    assert submit["start"] <= wait["start"] <= wait["end"] <= dispatch["end"]
    assert wait["end"] <= job["start"] <= job["end"]


def test_off_without_otel_variables() -> None:
    # No OTEL_* variable: setup leaves tracing off and imports neither our OpenTelemetry side
    # nor the SDK's tracing or exporters (redis-py 8 itself imports the SDK's metrics package
    # when it is installed; that is not ours to avoid).
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = ("import sys; from shared import tracing; import batcher.service, workers.runtime, "
            "gateway.app; print(tracing.setup('batcher'), any(m == 'shared.otel' or "
            "m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter')) "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
                               "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x",
                               "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})


async def test_untraced_submit_leaves_the_entry_as_it_was(client: httpx.AsyncClient,
                                                         settings: Settings) -> None:
    assert not tracing.ON
    await client.post("/v1/models/synthetic/jobs", json={"input": {"x": 1}},
                      headers={"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"})
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    entries: list[tuple[str, dict[str, str]]] = r.xrange(  # type: ignore[assignment]
        keys.stream("synthetic", "normal"))
    assert [set(fields) for _, fields in entries] == [{"job", "rows", "exp"}]


def test_log_lines_carry_trace_and_job_ids(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from shared import otel

    handler = logging.StreamHandler()
    lines: list[str] = []
    handler.emit = lambda record: lines.append(handler.format(record))  # type: ignore[method-assign]
    handler.addFilter(otel._LogIds())
    logger = logging.getLogger("tests.tracing")
    logger.addHandler(handler)
    try:
        tracer = TracerProvider().get_tracer("t")
        with tracer.start_as_current_span("s") as span:
            token = otel.LOG_IDS.set("batch=b1 jobs=j1,j2")
            logger.warning("predict failed model=%s", "m")
            otel.LOG_IDS.reset(token)
        ctx = span.get_span_context()
        assert lines == [f"predict failed model=m trace_id={ctx.trace_id:032x} "
                         f"span_id={ctx.span_id:016x} batch=b1 jobs=j1,j2"]
        assert trace.get_current_span() is trace.INVALID_SPAN
    finally:
        logger.removeHandler(handler)
