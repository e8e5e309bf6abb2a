"""Runs one batch of jobs through a loaded model: fetch, preprocess, predict, postprocess, store.

Per-item failures fail only their job. A `predict` that raises for the whole batch is retried on
halves until the failing item is alone, so its batch mates still succeed. The moment the predict
is over (done, failed, or past its time limit) the batcher is told its lane is free, in a
`finally`, before postprocess and the final write, which overlap the next batch's predict.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from shared import keys
from shared.histograms import END_TO_END, RUN, LatencyRecorder
from shared.model import InferenceModel, ModelContext
from shared.modelspec import ModelSpec
from shared.store import JobStore, Outcome, Started

if TYPE_CHECKING:
    from shared.otel import BatchTrace

log = logging.getLogger(__name__)
ITEM_LANES = 4  # threads running per-item pre/postprocess at once
# A predict past its time limit gets this long to finish after all before it counts as stuck.
STUCK_GRACE_S = 2.0
# The start and the final write are retried this long through a Redis outage before the batch
# is given up (its entries, no longer refreshed, then go back to the batcher).
OUTAGE_RETRY_S = 30.0
REPORT_RETRY_S = 1.0  # a lane report is retried this long (heartbeats tell the batcher later)

Outcome_ = Literal["ok", "error", "timeout"]
T = TypeVar("T")

@dataclass(frozen=True)
class BatchRequest:
    """What the batcher's Celery task carries: ids only, never payloads."""

    model: str
    batch_id: str
    job_ids: list[str]
    dispatched_ms: float = 0  # the batcher's wall clock at send, sub-millisecond
    solo: bool = False  # one suspect job run alone (see batcher.recovery)
    trace: BatchTrace | None = None  # the batch's spans when its jobs are traced


@dataclass
class BatchReport:
    """Sent back to the batcher (completion stream) and shown by tests."""

    batch_id: str
    rows: int
    # Wall-clock ms from the batcher's send to this worker starting the batch: the Celery
    # hand-off (clocks of one machine; across machines it includes their skew).
    handoff_ms: float | None = None
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    outcome: Outcome_ = "ok"
    predict_ms: float = 0.0  # predict spans, summed (a bisected batch runs several)
    lane_wait_ms: float = 0.0  # waiting for a predict lane, summed
    # Stage -> [start, end] intervals on the machine-wide monotonic clock (predict may run
    # several times when a failing batch is bisected).
    spans: dict[str, list[list[float]]] = field(default_factory=dict)

    def add_span(self, name: str, start: float, end: float) -> None:
        self.spans.setdefault(name, []).append([start, end])

    @classmethod
    def ended(cls, req: BatchRequest, outcome: Outcome_) -> BatchReport:
        """The report of a batch that ended short of its final write (error, timeout)."""
        return cls(req.batch_id, rows=len(req.job_ids), outcome=outcome)

    @classmethod
    def of(cls, req: BatchRequest) -> BatchReport:
        """The report of a batch being started now (its hand-off measured up to here)."""
        report = cls(req.batch_id, rows=len(req.job_ids))
        if req.dispatched_ms:
            report.handoff_ms = round(max(0.0, time.time() * 1000 - req.dispatched_ms), 3)
        return report


@dataclass
class Item:
    job_id: str
    attempts: int
    created_ms: int
    value: Any = None
    error: dict[str, str] | None = None


class BatchTimeout(Exception):
    """A predict ran past the model's time limit and its grace, and is still running (waiting
    for a lane does not count)."""


def _item_error(kind: str, exc: BaseException) -> dict[str, str]:
    return {"type": kind, "message": f"{type(exc).__name__}: {exc}"[:2000]}


class ModelRuntime:
    """One loaded model in one worker process. `run_batch` may run for several batches at once
    (one per Celery slot); only `predict_concurrency` predicts overlap."""

    def __init__(self, spec: ModelSpec, ctx: ModelContext, store: JobStore, *, consumer: str,
                 lane_free: Callable[[str], None] | None = None,
                 compute_thread_init: Callable[[], None] | None = None,
                 attempt_cap: int = 0) -> None:
        self.spec = spec
        self.ctx = ctx
        self.store = store
        self.consumer = consumer
        self.lane_free = lane_free or (lambda batch_id: None)
        self._reports: set[asyncio.Task[None]] = set()
        self.attempt_cap = attempt_cap
        self.tail_ms = 0.0  # postprocess + final write, smoothed: reported with the next batch
        self.latencies = LatencyRecorder(spec.name)  # flushed by the worker's heartbeat
        self.model: InferenceModel = spec.cls(**spec.params)
        concurrency = spec.options.predict_concurrency
        self._predict_slots = asyncio.Semaphore(concurrency)
        # load() and predict() run on these threads only: they are the ones pinned to a CPU slot.
        self._predict_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="predict",
                                                initializer=compute_thread_init)
        self._item_pool = ThreadPoolExecutor(ITEM_LANES, thread_name_prefix="items")

    def load(self) -> None:
        """Load weights; runs before the worker consumes any batch."""
        started = time.monotonic()
        # On the compute thread, so a warm-up inside load() runs where predict will.
        self._predict_pool.submit(self.model.load, self.ctx.device).result()
        log.info("model loaded model=%s device=%s load_s=%.2f", self.spec.name, self.ctx.device,
                 time.monotonic() - started)

    async def run_batch(self, req: BatchRequest) -> BatchReport:
        """Run the batch and write every job's final state (one round trip each way).

        A batch of one job runs preprocess, predict and postprocess in one hop to the compute
        thread, and its lane report goes out in the same round trip as its final write."""
        t0 = time.monotonic()
        report = BatchReport.of(req)
        if req.trace is not None:
            req.trace.started(req.model, req.batch_id, self.ctx.worker_name)
        outcomes: list[Outcome] = []
        items: list[Item] = []
        whole = False  # the lone job's stages all ran: report with the final write
        try:
            # Retried, not given up: a START whose reply a dying connection lost may have run,
            # and a batch given up then comes back as a suspect with one attempt more.
            starts = await _through_outage(
                "start", f"jobs={len(req.job_ids)}", lambda: self.store.start(
                    req.job_ids, self.ctx.worker_name, self.ctx.device_label or self.ctx.device,
                    consumer=self.consumer, solo=req.solo, attempt_cap=self.attempt_cap,
                    batch_id=req.batch_id))
            poison: list[Started] = []
            for st in starts:
                self._sort(st, items, outcomes, report, poison)
            for st in poison:
                await self.store.dead_letter(req.model, st.job_id, st.attempts, "attempts")
            started_ms = time.time() * 1000
            if len(items) == 1:
                await self._run_alone(items[0], report)
                whole = True
            else:
                await self._each(items, self._parse_and_preprocess, "preprocess_error")
                report.add_span("preprocess", t0, time.monotonic())
                live = [it for it in items if it.error is None]
                results = await self._predict([it.value for it in live], report) if live else []
        except BatchTimeout:
            report.outcome = "timeout"
            raise
        except asyncio.CancelledError:  # the worker's overall limit on the batch
            report.outcome = "timeout"
            raise
        except BaseException:
            report.outcome = "error"
            raise
        finally:
            if not whole:
                self._report_soon(report)
            if req.trace is not None and report.outcome != "ok":
                req.trace.finished(report.spans, t0, {}, report.outcome)
        q0 = time.monotonic()
        if not whole:
            for it, res in zip(live, results, strict=True):
                if isinstance(res, BaseException):
                    it.error = _item_error("predict_error", res)
                else:
                    it.value = res
            await self._each(items, self._postprocess, "postprocess_error")
            report.add_span("postprocess", q0, time.monotonic())

        run_ms = round((time.monotonic() - t0) * 1000, 3)
        outcomes += self.outcomes_of(items, started_ms, run_ms, report)
        if whole:
            self.lane_free(report.batch_id)
            await self.finish(outcomes, report=self.report_fields(report))
        elif outcomes:
            await self.finish(outcomes)
        self.finished(items, run_ms, q0)
        if req.trace is not None:
            req.trace.finished(report.spans, t0, {it.job_id: it.error for it in items})
        return report

    def outcomes_of(self, items: list[Item], started_ms: float, run_ms: float,
                    report: BatchReport) -> list[Outcome]:
        """The final states of the batch's items, counted into `report`."""
        outcomes = []
        for it in items:
            metrics = {"queue_ms": round(max(0.0, started_ms - it.created_ms), 3),
                       "run_ms": run_ms, "batch_size": len(items),
                       "device": self.ctx.device_label or self.ctx.device,
                       "device_uuid": self.ctx.device_uuid or None}
            if it.error is None:
                outcomes.append(Outcome(it.job_id, "succeeded", output_json=it.value,
                                        metrics=metrics))
                report.ok += 1
            else:
                outcomes.append(Outcome(it.job_id, "failed", error=it.error, metrics=metrics))
                report.failed += 1
        return outcomes

    def finished(self, items: list[Item], run_ms: float, tail_from: float) -> None:
        """After the final write: the latency histograms and the smoothed tail (postprocess
        and final write, from `tail_from`) reported with the next batch."""
        done_ms = time.time() * 1000
        for it in items:
            self.latencies.observe(RUN, run_ms / 1000)
            self.latencies.observe(END_TO_END, max(0.0, done_ms - it.created_ms) / 1000)
        tail_ms = (time.monotonic() - tail_from) * 1000
        self.tail_ms = tail_ms if not self.tail_ms else self.tail_ms + (tail_ms - self.tail_ms) / 8

    async def _run_alone(self, it: Item, report: BatchReport) -> None:
        """One job: parse, preprocess, predict and postprocess in one hop to the compute thread
        (a one-item batch has nothing to overlap, and each hop costs more than small stages)."""
        spans: dict[str, tuple[float, float]] = {}
        w0 = time.monotonic()
        async with self._predict_slots:
            report.lane_wait_ms += (time.monotonic() - w0) * 1000
            (kind, value), _ = await self._on_compute_thread(
                lambda: self.stages(it.value, spans), 1, report)
        self.settle(it, kind, value, spans, report)

    def stages(self, raw: Any, spans: dict[str, tuple[float, float]]
               ) -> tuple[str | None, Any]:
        """One item's parse, preprocess, predict and postprocess in the calling thread: (None,
        output JSON), or (the failed stage's error kind, its exception). Times each stage into
        `spans`."""
        try:
            with _timed(spans, "preprocess"):
                value = self._parse_and_preprocess(raw)
        except BaseException as exc:
            return "preprocess_error", exc
        try:
            with _timed(spans, "predict"):
                out = self.model.predict([value])
            if len(out) != 1:
                raise ValueError(f"predict returned {len(out)} results for 1 item")
        except Exception as exc:
            return "predict_error", exc
        try:
            with _timed(spans, "postprocess"):
                return None, self._postprocess(out[0])
        except BaseException as exc:
            return "postprocess_error", exc

    @staticmethod
    def settle(it: Item, kind: str | None, value: Any,
               spans: dict[str, tuple[float, float]], report: BatchReport) -> None:
        """Put `stages`' result into the item and its timings into the report."""
        for name, (start, end) in spans.items():
            report.add_span(name, start, end)
        if "predict" in spans:
            report.predict_ms += (spans["predict"][1] - spans["predict"][0]) * 1000
        if kind is None:
            it.value = value
        else:
            invalid = kind == "preprocess_error" and isinstance(value, ValidationError)
            it.error = _item_error("invalid_input" if invalid else kind, value)

    def _sort(self, st: Started, items: list[Item], outcomes: list[Outcome],
              report: BatchReport, poison: list[Started]) -> None:
        if st.verdict == "run":
            items.append(Item(st.job_id, st.attempts, st.created_ms, st.input_json))
        elif st.verdict == "poison":
            poison.append(st)
            outcomes.append(Outcome(st.job_id, "failed", error={
                "type": "poison",
                "message": f"the job took its worker down {self.store.max_attempts} times "
                           "while running alone; moved to the dead-letter stream"}))
        elif st.verdict == "expired":
            outcomes.append(Outcome(st.job_id, "expired", error={
                "type": "expired", "message": "the job waited longer than its ttl_s"}))
        elif st.verdict == "deadline":  # never computed: worthless past its deadline
            outcomes.append(Outcome(st.job_id, "expired", error={
                "type": "deadline_exceeded",
                "message": "the job's deadline passed before it could start"}))
        else:  # moved, canceled, already final, missing
            report.skipped += 1

    def _report_soon(self, report: BatchReport) -> None:
        """Tell the batcher the lane is free, without waiting for the reply: the postprocess
        and the final write go on meanwhile."""
        self.lane_free(report.batch_id)
        task = asyncio.create_task(self.send_report(report))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def send_report(self, report: BatchReport) -> None:
        fields = self.report_fields(report)
        try:
            await _through_outage(
                "lane report", f"batch={report.batch_id}",
                lambda: self.store.redis.xadd(keys.completions(self.spec.name),
                                              fields,  # type: ignore[arg-type]
                                              maxlen=keys.COMPLETIONS_MAXLEN, approximate=True),
                within_s=REPORT_RETRY_S)
        except (RedisError, OSError) as exc:
            # The batcher then learns the lane is free from the worker's heartbeats, which stop
            # listing the batch.
            log.warning("lane report failed batch=%s error=%s", report.batch_id, exc)

    async def finish(self, outcomes: list[Outcome],
                     report: dict[str, str] | None = None) -> None:
        """Write final states (and the lane report with them, when given), riding out a Redis
        outage of up to OUTAGE_RETRY_S (first write wins, so a repeat is harmless)."""
        extra = None if report is None else (keys.completions(self.spec.name), report)
        await _through_outage("final write", f"jobs={len(outcomes)}",
                              lambda: self.store.finish(outcomes, report=extra))

    async def _each(self, items: list[Item], fn: Any, error_kind: str) -> None:
        """Apply a per-item step concurrently; an exception fails that item only.

        Up to ITEM_LANES pool threads take the items in turn, so a slow item does not hold up
        the others, and the event loop pays one cross-thread hand-off per lane rather than one
        per item (which cost more than the step itself for small items)."""
        todo = [it for it in items if it.error is None]
        if not todo:
            return
        done: list[Any] = [None] * len(todo)
        order = iter(range(len(todo)))  # next() on it is atomic under the GIL

        def lane() -> None:
            for i in order:
                try:
                    done[i] = fn(todo[i].value)
                except BaseException as exc:  # this item fails alone, as before
                    done[i] = exc

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._item_pool, lane)
                               for _ in range(min(ITEM_LANES, len(todo)))))
        for it, value in zip(todo, done, strict=True):
            if isinstance(value, BaseException):
                kind = "invalid_input" if isinstance(value, ValidationError) else error_kind
                it.error = _item_error(kind, value)
            else:
                it.value = value

    def _parse_and_preprocess(self, raw: str) -> Any:
        # The payload is parsed exactly once, here, straight into the model's Input type.
        return self.model.preprocess(self.spec.cls.Input.model_validate_json(raw))

    def _postprocess(self, result: Any) -> str:
        out = self.model.postprocess(result)
        if not isinstance(out, BaseModel):
            out = self.spec.cls.Output.model_validate(out)
        return out.model_dump_json()

    async def _predict(self, batch: list[Any], report: BatchReport) -> list[Any]:
        """Predict the batch; on a whole-batch exception, bisect to isolate the bad items."""
        try:
            w0 = time.monotonic()
            async with self._predict_slots:
                began = time.monotonic()
                report.lane_wait_ms += (began - w0) * 1000
                try:
                    out, began = await self._on_compute_thread(
                        lambda: self.model.predict(batch), len(batch), report)
                finally:
                    p1 = time.monotonic()
                    report.add_span("predict", began, p1)
                    report.predict_ms += (p1 - began) * 1000
            if len(out) != len(batch):
                raise ValueError(f"predict returned {len(out)} results for {len(batch)} items")
            return list(out)
        except BatchTimeout:
            raise
        except Exception as exc:  # the model's own failure: isolate it, never fail the batch
            if len(batch) == 1:
                return [exc]
            mid = len(batch) // 2
            log.info("predict failed, bisecting model=%s size=%d error=%s", self.spec.name,
                     len(batch), type(exc).__name__)
            return (await self._predict(batch[:mid], report)
                    + await self._predict(batch[mid:], report))

    def on_compute_thread(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """`fn` on the compute thread (the one pinned to the slot), with no time limit: the
        caller watches it (see `workers.direct`)."""
        return self._predict_pool.submit(fn)

    async def _on_compute_thread(self, fn: Callable[[], T], size: int,
                                 report: BatchReport) -> tuple[T, float]:
        """`fn` on the compute thread, within the time limit (plus a grace in which a late
        result is still taken); returns its result and when it began (monotonic).

        The limit starts when `fn` does: the thread may still be running a lone batch that went
        there directly (`workers.direct`, which holds no permit of `_predict_slots`). That wait
        counts as waiting for a lane, as a wait for a permit does."""
        loop = asyncio.get_running_loop()
        began: asyncio.Future[float] = loop.create_future()
        queued = time.monotonic()

        def run() -> T:
            loop.call_soon_threadsafe(_resolve, began, time.monotonic())
            return fn()

        future = asyncio.wrap_future(self.on_compute_thread(run))
        either: list[asyncio.Future[Any]] = [began, future]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        start = began.result() if began.done() else time.monotonic()
        report.lane_wait_ms += (start - queued) * 1000
        limit_s = self.spec.options.batch_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit_s), start
        except TimeoutError:
            pass
        try:
            out = await asyncio.wait_for(asyncio.shield(future), STUCK_GRACE_S)
        except TimeoutError:
            # The thread cannot be stopped: the worker process exits on BatchTimeout.
            raise BatchTimeout(limit_s) from None
        log.warning("predict finished past its time limit model=%s size=%d limit_s=%s",
                    self.spec.name, size, limit_s)
        return out, start

    def outer_limit_s(self) -> float:
        """The most one batch may take in all before its worker counts as stuck: a lane wait
        and a predict (each up to the time limit and its grace), pre- and postprocess, and the
        start and the final write each riding out a Redis outage (an outage is not a hang)."""
        return 3 * self.spec.options.batch_timeout_s + 2 * OUTAGE_RETRY_S

    def timeout_outcomes(self, req: BatchRequest) -> list[Outcome]:
        limit = self.spec.options.batch_timeout_s
        err = {"type": "timeout", "message": f"the batch ran past its time limit of {limit} s"}
        return [Outcome(j, "failed", error=err) for j in req.job_ids]

    def report_fields(self, report: BatchReport) -> dict[str, str]:
        """The lane-free report as stream fields (see `batcher.service._on_report`)."""
        fields = {"batch": report.batch_id, "rows": str(report.rows),
                  "worker": self.ctx.worker_name, "outcome": report.outcome,
                  "predict_ms": f"{report.predict_ms:.3f}",
                  "lane_wait_ms": f"{report.lane_wait_ms:.3f}", "tail_ms": f"{self.tail_ms:.3f}",
                  "skipped": str(report.skipped), "spans": json.dumps(report.spans)}
        if report.handoff_ms is not None:
            fields["handoff_ms"] = str(report.handoff_ms)
        return fields


@contextlib.contextmanager
def _timed(spans: dict[str, tuple[float, float]], name: str) -> Iterator[None]:
    """Put the (start, end) of the block into `spans[name]`, however it ends."""
    start = time.monotonic()
    try:
        yield
    finally:
        spans[name] = (start, time.monotonic())


def _resolve(future: asyncio.Future[float], value: float) -> None:
    if not future.done():
        future.set_result(value)


async def _through_outage(what: str, fields: str, call: Callable[[], Awaitable[T]], *,
                          within_s: float | None = None) -> T:
    """`call`, retried with backoff through a Redis outage of up to `within_s` (default
    OUTAGE_RETRY_S); only for writes that are safe to repeat. `what` and `fields` name it in
    the log."""
    deadline = time.monotonic() + (OUTAGE_RETRY_S if within_s is None else within_s)
    backoff_s = 0.05
    while True:
        try:
            return await call()
        except (RedisError, OSError) as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("%s failed, retrying %s error=%s", what, fields, exc)
            await asyncio.sleep(backoff_s)
            backoff_s = min(1.0, backoff_s * 2)
