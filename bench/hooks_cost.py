"""What the tracing and metrics hooks cost on the hot path, per call, with tracing off (the
default) and on (an SDK with no exporter, so only span creation is measured).

    python -m bench.hooks_cost

Prints one line per hook: nanoseconds per call, the best of several repeats.
"""

from __future__ import annotations

import contextlib
import os
import timeit
from collections.abc import Callable
from typing import Any

from batcher.streams import make_entry
from shared import tracing
from shared.histograms import END_TO_END, RUN, LatencyRecorder

REPEAT, NUMBER = 5, 20_000


def best_ns(fn: Callable[[], Any], number: int = NUMBER) -> float:
    return min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number * 1e9


def main() -> None:
    fields = {"job": "a" * 32, "rows": "1", "exp": "1800000000000"}
    traced = {**fields, tracing.ENTRY_FIELD: f"00-{'1' * 32}-{'2' * 16}-01"}
    rec = LatencyRecorder("m")

    async def inner() -> int:
        return 1

    async def wrapped() -> int:
        if not tracing.ON:
            return await inner()
        return 0

    def submit_path(coro: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            c = coro()
            with contextlib.suppress(StopIteration):
                c.send(None)
        return run

    def observe_job() -> None:
        rec.observe(RUN, 0.01)
        rec.observe(END_TO_END, 0.02)

    rows = [
        ("tracing.ON check", best_ns(lambda: tracing.ON and None, 200_000)),
        ("make_entry (untraced entry)", best_ns(lambda: make_entry("s", "normal", "1-0", fields))),
        ("gateway submit: direct coroutine", best_ns(submit_path(inner))),
        ("gateway submit: behind the tracing check", best_ns(submit_path(wrapped))),
        ("worker: run + end-to-end histogram, per job",
         best_ns(observe_job)),
    ]
    os.environ["OTEL_TRACES_EXPORTER"] = "none"  # the SDK, exporting nowhere
    from shared import otel

    otel.configure("bench")
    jobs = [(f"job{i}", traced[tracing.ENTRY_FIELD], 1_700_000_000_000) for i in range(16)]
    rows.append(("tracing on: dispatch spans of a 16-job batch",
                 best_ns(lambda: otel.DispatchTrace("m", "b", "w", jobs).end(16), 500)))
    for name, ns in rows:
        print(f"{name:<48} {ns:10.0f} ns")


if __name__ == "__main__":
    main()
