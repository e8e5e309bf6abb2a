"""Runs one batch of jobs through a loaded model: fetch, preprocess, predict, postprocess, store.

Per-item failures fail only their job. A `predict` that raises for the whole batch is retried on
halves until the failing item is alone, so its batch mates still succeed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from shared.model import InferenceModel, ModelContext
from shared.modelspec import ModelSpec
from shared.store import JobStore, Outcome

log = logging.getLogger(__name__)
ITEM_LANES = 4  # threads running per-item pre/postprocess at once


@dataclass(frozen=True)
class BatchRequest:
    """What the batcher's Celery task carries: ids only, never payloads."""

    model: str
    batch_id: str
    job_ids: list[str]
    dispatched_ms: float = 0  # the batcher's wall clock at send, sub-millisecond


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
    # Stage -> [start, end] intervals on the machine-wide monotonic clock (predict may run
    # several times when a failing batch is bisected).
    spans: dict[str, list[list[float]]] = field(default_factory=dict)

    def add_span(self, name: str, start: float, end: float) -> None:
        self.spans.setdefault(name, []).append([start, end])


@dataclass
class _Item:
    job_id: str
    attempts: int
    created_ms: int
    value: Any = None
    error: dict[str, str] | None = None


class BatchTimeout(Exception):
    """A predict ran past the model's time limit (waiting for a predict slot does not count)."""


def _item_error(kind: str, exc: BaseException) -> dict[str, str]:
    return {"type": kind, "message": f"{type(exc).__name__}: {exc}"[:2000]}


class ModelRuntime:
    """One loaded model in one worker process. `run_batch` may run for several batches at once
    (one per Celery slot); only `predict_concurrency` predicts overlap."""

    def __init__(self, spec: ModelSpec, ctx: ModelContext, store: JobStore,
                 compute_thread_init: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.ctx = ctx
        self.store = store
        self.model: InferenceModel = spec.cls(**spec.params)
        concurrency = spec.options.predict_concurrency
        self._predict_slots = asyncio.Semaphore(concurrency)
        # load() and predict() run on these threads only: they are the ones pinned to a CPU slot.
        self._predict_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="predict",
                                                initializer=compute_thread_init)
        self._item_pool = ThreadPoolExecutor(ITEM_LANES, thread_name_prefix="items")
        self.abandoned: list[concurrent.futures.Future[Any]] = []

    def load(self) -> None:
        """Load weights; runs before the worker consumes any batch."""
        started = time.monotonic()
        # On the compute thread, so a warm-up inside load() runs where predict will.
        self._predict_pool.submit(self.model.load, self.ctx.device).result()
        log.info("model loaded model=%s device=%s load_s=%.2f", self.spec.name, self.ctx.device,
                 time.monotonic() - started)

    async def run_batch(self, req: BatchRequest) -> BatchReport:
        """Run the batch and write every job's final state (one round trip each way)."""
        t0 = time.monotonic()
        report = BatchReport(req.batch_id, rows=len(req.job_ids))
        if req.dispatched_ms:
            report.handoff_ms = round(max(0.0, time.time() * 1000 - req.dispatched_ms), 3)
        outcomes: list[Outcome] = []
        items: list[_Item] = []
        for st in await self.store.start(req.job_ids, self.ctx.worker_name,
                                         self.ctx.device_label or self.ctx.device):
            if st.verdict == "run":
                items.append(_Item(st.job_id, st.attempts, st.created_ms, st.input_json))
            elif st.verdict == "poison":
                await self.store.dead_letter(req.model, st.job_id, st.attempts, "attempts")
                outcomes.append(Outcome(st.job_id, "failed", error={
                    "type": "poison",
                    "message": f"the job was attempted {st.attempts - 1} times and its worker "
                               "died each time; moved to the dead-letter stream"}))
            elif st.verdict == "expired":
                outcomes.append(Outcome(st.job_id, "expired", error={
                    "type": "expired", "message": "the job waited longer than its ttl_s"}))
            else:
                report.skipped += 1
        started_ms = time.time() * 1000

        await self._each(items, self._parse_and_preprocess, "preprocess_error")
        report.add_span("preprocess", t0, time.monotonic())
        live = [it for it in items if it.error is None]
        results = await self._predict([it.value for it in live], report) if live else []
        for it, res in zip(live, results, strict=True):
            if isinstance(res, BaseException):
                it.error = _item_error("predict_error", res)
            else:
                it.value = res
        q0 = time.monotonic()
        await self._each(items, self._postprocess, "postprocess_error")
        report.add_span("postprocess", q0, time.monotonic())

        run_ms = round((time.monotonic() - t0) * 1000, 3)
        for it in items:
            metrics = {"queue_ms": round(max(0.0, started_ms - it.created_ms), 3),
                       "run_ms": run_ms, "batch_size": len(items),
                       "device": self.ctx.device_label or self.ctx.device}
            if it.error is None:
                outcomes.append(Outcome(it.job_id, "succeeded", output_json=it.value,
                                        metrics=metrics))
                report.ok += 1
            else:
                outcomes.append(Outcome(it.job_id, "failed", error=it.error, metrics=metrics))
                report.failed += 1
        if outcomes:
            await self.store.finish(outcomes)
        return report

    async def _each(self, items: list[_Item], fn: Any, error_kind: str) -> None:
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
            async with self._predict_slots:
                p0 = time.monotonic()
                try:
                    work = self._predict_pool.submit(self.model.predict, batch)
                    try:
                        out = await asyncio.wait_for(asyncio.wrap_future(work),
                                                     self.spec.options.batch_timeout_s)
                    except TimeoutError:
                        # The thread cannot be stopped; remember it so the process can tell
                        # whether it finishes on its own or the worker must be restarted.
                        self.abandoned.append(work)
                        raise BatchTimeout(self.spec.options.batch_timeout_s) from None
                finally:
                    report.add_span("predict", p0, time.monotonic())
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

    @property
    def stuck(self) -> bool:
        """A predict that ran past its time limit is still running."""
        self.abandoned = [f for f in self.abandoned if not f.done()]
        return bool(self.abandoned)

    def timeout_outcomes(self, req: BatchRequest) -> list[Outcome]:
        limit = self.spec.options.batch_timeout_s
        err = {"type": "timeout", "message": f"the batch ran past its time limit of {limit} s"}
        return [Outcome(j, "failed", error=err) for j in req.job_ids]

    def report_fields(self, report: BatchReport) -> dict[str, str]:
        fields = {"batch": report.batch_id, "rows": str(report.rows), "ok": str(report.ok),
                  "failed": str(report.failed), "worker": self.ctx.worker_name,
                  "spans": json.dumps(report.spans)}
        if report.handoff_ms is not None:
            fields["handoff_ms"] = str(report.handoff_ms)
        return fields
