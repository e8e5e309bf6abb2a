"""asyncinfer's load generator: the one that `asyncinfer bench`, the benchmarks (bench/) and the
tests use.

- Open loop (`mode="open"`): Poisson or evenly spaced (`arrivals="fixed"`) arrivals at a set
  rate; latency from the scheduled arrival, so queueing cannot hide (no coordinated omission).
- Closed loop (`mode="closed"`): C clients, each sending its next job when the last is over.
- Protocols: `jobs` (submit, then long-poll), `jobs-wait` (`Prefer: wait` on the submit), `submit`
  (the POST alone) and `sync` (one POST answered with the result, a peer's endpoint).
- `SteadyLoad`: a fixed-rate submit load in a background thread, for chaos tests.

It speaks HTTP/1.1 over keep-alive connections with a small client of its own (tens of
microseconds of CPU per request, against milliseconds for httpx), so one process on uvloop
drives a few thousand jobs a second.

    summary = run_blocking(Config(url, "/v1/models/mlp/jobs", rate=200), lambda i: body)
    python -m asyncinfer.loadgen --url http://127.0.0.1:8000 --model mlp --bodies b.jsonl ...
"""

from asyncinfer.loadgen.drive import Config, run, run_blocking
from asyncinfer.loadgen.protocols import PROTOCOLS, Outcome
from asyncinfer.loadgen.stats import OK_STATUSES, percentiles
from asyncinfer.loadgen.steady import SteadyLoad

__all__ = ["OK_STATUSES", "PROTOCOLS", "Config", "Outcome", "SteadyLoad", "percentiles", "run",
           "run_blocking"]
