"""A lone batch run start to end on the compute thread, with no hop through the event loop.

A one-job batch on the event loop's path crosses threads four times: Celery's consumer thread
hands it to the loop, which runs START, hops to the compute thread for the stages and back for
the final write. When the worker holds nothing else there is nothing for the loop to overlap,
so the batch goes from Celery's thread straight to the compute thread, which runs START, the
stages and the final write (with the lane report) itself, through a blocking client: one
cross-thread hop instead of four (measured in docs/benchmarks.md, "Where a lone job's time
goes").

Taken only for a batch of one job that is not a suspect run alone (`solo`: its give-up path
fails it on the loop), not traced, while the worker holds no other batch (so the compute thread
is idle and no lane is waited for). What this path does not handle it hands to the loop, whose
path rides out Redis outages:
- a START that fails, or finds anything but one job to run: the whole batch runs on the loop
  (START is safe to repeat for the same batch: a job it started answers 'run' again, with its
  attempts unchanged; the other verdicts change nothing);
- a final write that fails: the loop writes those outcomes, retrying through the outage (if
  the first try's lane report landed, the batcher gets it twice and counts the batch once).

A predict that hangs cannot be interrupted here either: `stuck` lists the batches running past
the time limit and its grace, and the worker's heartbeat gives up on them as the loop's path
does (a timeout report, then the process exits for its launcher to restart it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from redis.exceptions import RedisError

from shared import keys
from shared.store import Outcome
from shared.syncstore import BlockingWrites
from workers.runtime import STUCK_GRACE_S, BatchReport, BatchRequest, Item, ModelRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectResult:
    """How far the compute thread took the batch."""

    done: bool  # ran to its final write
    # The final write that failed: (outcomes, lane report fields), for the loop to write.
    unwritten: tuple[list[Outcome], dict[str, str]] | None = None


class DirectPath:
    """Runs lone batches on the compute thread and keeps track of them for the watchdog."""

    def __init__(self, runtime: ModelRuntime, writes: BlockingWrites) -> None:
        self.runtime = runtime
        self.writes = writes
        self._lock = threading.Lock()  # the compute thread writes, the heartbeat's reads
        # batch -> (it, when its stages began, monotonic) while they run: START and the final
        # write are Redis round trips, and a Redis stall is an outage, not a hang.
        self._computing: dict[str, tuple[BatchRequest, float]] = {}
        self._reported: set[str] = set()  # stuck batches already handed to the watchdog

    @staticmethod
    def eligible(req: BatchRequest, held: int) -> bool:
        """Whether this batch may take the direct path while the worker holds `held` others."""
        return len(req.job_ids) == 1 and not req.solo and req.trace is None and held == 0

    def submit(self, req: BatchRequest) -> concurrent.futures.Future[DirectResult]:
        """Start the batch on the compute thread; the future ends with how far it got."""
        running = self.runtime.on_compute_thread(lambda: self._run(req))
        running.add_done_callback(lambda _: self._over(req.batch_id))
        return running

    def stuck(self, now: float) -> list[BatchRequest]:
        """Batches whose stages have run here past the model's time limit and its grace (`now`:
        monotonic), each listed once: the caller gives up on them."""
        limit_s = self.runtime.spec.options.batch_timeout_s + STUCK_GRACE_S
        with self._lock:
            late = [req for b, (req, since) in self._computing.items()
                    if now - since > limit_s and b not in self._reported]
            self._reported.update(req.batch_id for req in late)
        return late

    @contextlib.contextmanager
    def _computing_now(self, req: BatchRequest) -> Iterator[None]:
        with self._lock:
            self._computing[req.batch_id] = (req, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._computing.pop(req.batch_id, None)

    def _over(self, batch_id: str) -> None:
        with self._lock:
            self._reported.discard(batch_id)

    def _run(self, req: BatchRequest) -> DirectResult:
        rt = self.runtime
        t0 = time.monotonic()
        report = BatchReport.of(req)
        try:
            starts = self.writes.start(
                req.job_ids, rt.ctx.worker_name, rt.ctx.device_label or rt.ctx.device,
                consumer=rt.consumer, solo=False, attempt_cap=rt.attempt_cap,
                batch_id=req.batch_id)
        except (RedisError, OSError) as exc:
            log.warning("direct start failed, batch goes to the loop batch=%s error=%s",
                        req.batch_id, exc)
            return DirectResult(done=False)
        if len(starts) != 1 or starts[0].verdict != "run":
            return DirectResult(done=False)
        st = starts[0]
        it = Item(st.job_id, st.attempts, st.created_ms, st.input_json)
        started_ms = time.time() * 1000
        spans: dict[str, tuple[float, float]] = {}
        with self._computing_now(req):
            kind, value = rt.stages(it.value, spans)
        rt.settle(it, kind, value, spans, report)
        q0 = time.monotonic()
        run_ms = round((q0 - t0) * 1000, 3)
        outcomes = rt.outcomes_of([it], started_ms, run_ms, report)
        rt.lane_free(req.batch_id)
        fields = rt.report_fields(report)
        try:
            self.writes.finish(outcomes, (keys.completions(rt.spec.name), fields))
        except (RedisError, OSError) as exc:
            log.warning("direct final write failed, the loop retries it batch=%s error=%s",
                        req.batch_id, exc)
            return DirectResult(done=False, unwritten=(outcomes, fields))
        rt.finished([it], run_ms, q0)
        return DirectResult(done=True)
