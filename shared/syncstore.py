"""A worker's START and final write through a blocking client, for a batch run start to end on
its compute thread (see `workers.direct`).

The scripts, their arguments and the reading of their replies are `shared.store.JobStore`'s:
only the client differs. A blocking round trip from the thread that runs the model costs less
than a hop to the event loop's thread and back, which is what a lone job pays twice otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis

from shared import scripts
from shared.store import (
    JobStore,
    Outcome,
    Started,
    finished,
    queue_report_and_finish,
    reported_finish,
    started,
)


class BlockingWrites:
    """`JobStore.start` and `JobStore.finish` (with a lane report) on a blocking client. Safe
    to share between threads (each call takes its own pooled connection)."""

    def __init__(self, store: JobStore, client: redis.Redis) -> None:
        self.store = store
        self.client = client
        self._start = client.register_script(scripts.START)
        self._finish = client.register_script(scripts.FINISH)

    def start(self, job_ids: Sequence[str], worker: str, device: str, *, consumer: str,
              solo: bool, attempt_cap: int, batch_id: str) -> list[Started]:
        job_keys, args = self.store.start_call(job_ids, worker, device, consumer=consumer,
                                               solo=solo, attempt_cap=attempt_cap,
                                               batch_id=batch_id)
        return started(job_ids, self._start(keys=job_keys, args=args))

    def finish(self, outcomes: Sequence[Outcome], report: tuple[str, Mapping[str, str]]
               ) -> list[bool]:
        """The final write with the lane report XADDed first, one round trip."""
        job_keys, args = self.store.finish_call(outcomes)
        pipe = self.client.pipeline(transaction=False)
        queue_report_and_finish(pipe, report, self._finish.sha, job_keys, args)
        replies = reported_finish(*pipe.execute(raise_on_error=False))
        if replies is None:  # a restarted Redis: load the script, once
            replies = self._finish(keys=job_keys, args=args)
        return finished(replies)

    def close(self) -> None:
        self.client.close()
