"""The fixed text of docs/benchmarks.md: method, reproduction, and the hot-path section whose
before/after table bench.profile_hotpath writes between markers (a new report keeps it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METHOD = """## Method

- **Same model, same batching limits.** asyncinfer serves `workers.builtin.mlp:MLPModel`;
  BentoML (bench/bentoml_service/service.py, `@bentoml.api(batchable=True, max_batch_size=64,
  max_latency_ms=250)`, a synchronous endpoint) serves the network from the same `build_mlp()`
  (same fixed-seed weights). The BentoML version is pinned in bench/systems.py
  (`BENTOML_PIN`) and installed into its own virtual environment.
- **Equal CPU.** On CPU every system gets the whole machine: asyncinfer runs `asyncinfer up
  --no-flower` with `ASYNCINFER_DEVICES=cpu:N` and a models file that fixes `min_workers =
  max_workers = N` (N = 2 on this 2-core machine: one worker pinned to each core, one torch
  thread each; gateway, batcher, autoscaler and Redis float). BentoML runs `bentoml serve` with
  `workers=2` (its docs' advice for CPU: one worker per core) and, beside it, `workers=1`; one
  torch thread per worker, `threads=1`. On a GPU (`--device cuda`) asyncinfer runs one worker
  on the GPU, its gateway with the default number of server processes (one per 4 cores: 4 on
  the 16-core GPU host), and both BentoML configurations put their model on `cuda:0` (BentoML
  built there from wheels, on that machine's own CUDA torch). All systems are up at once and
  driven in turn (the others idle), so noise from other work hits them alike.
- **One load generator.** `asyncinfer.loadgen` (the one behind `asyncinfer bench`), in a
  process of its own on uvloop, with a small keep-alive HTTP/1.1 client (tens of µs of CPU per
  request; it drives several thousand jobs/s from one process, see the HTTP ceilings). A job is
  POST submit then GET `/v1/jobs/{id}?wait=` until final (asyncinfer's contract), the same with
  `Prefer: wait` on the submit (one request per job), or one POST to `/predict` (BentoML).
  Open loop: Poisson arrivals, latency from the scheduled arrival (no coordinated omission), at
  most 2,048 jobs in flight. Closed loop: C clients back to back.
- **Loads.** One client: closed loop, C = 1. Saturation: closed loop at each client count of
  the profile; a system's saturation point is the count with the most goodput. Offered loads:
  open loop at fractions of asyncinfer's saturation throughput (submit + long-poll), the same
  absolute rates for every system, climbing (BentoML driven past its peak goes on refusing for a
  while). Between runs each system drains (asyncinfer until its queue is empty, BentoML until it
  answers again).
- **Statistics.** Per run: the first seconds of arrivals are left out, then up to 20 s for
  stragglers. Throughput = successful completions inside the measured window per second;
  goodput = jobs of the window that succeeded within max_latency_ms of their arrival, per
  second; p50/p99 over the jobs that arrived in the window and succeeded (failures are counted,
  not timed). Jobs per CPU-second = successful jobs over the CPU (user + system) that all of the
  system's processes spent during the run, read from /proc before and after (the generator's is
  separate). Batch size: `metrics.batch_size` of the jobs (asyncinfer) or BentoML's
  `bentoml_service_adaptive_batch_size` histogram. With repeats, each figure is the median.
- **The model alone.** `bench/model_limit.py`: the network in one process pinned like a worker,
  no HTTP, no Redis; the batch-of-one time is the forward pass of one row.
"""

REPRODUCE = """## Reproduce

```bash
python -m bench.run --quick               # ~5 min on 2 cores: one repeat, short runs
python -m bench.run --full                # ~15-20 min: repeats, more client counts and loads
python -m bench.run --quick --device cuda # the MLP tables on a GPU; skips cleanly without CUDA
python -m bench.report                    # redo this page and the plots from docs/bench-data/
python -m bench.run --quick --scale 0.3 --no-publish --no-docs   # a smoke test (~3 min)
```

The first run makes BentoML's virtual environment under bench/results/.venv-bentoml (the pinned
torch and BentoML; a machine that reaches no package index runs without BentoML and says so).
Each run keeps its raw JSON in bench/results/<stamp>/ and publishes it to
docs/bench-data/<device>/ (`--no-publish` keeps the published set). The generator on its own:
`asyncinfer bench MODEL --rate R --duration S` (or `--concurrency C`), or
`python -m asyncinfer.loadgen --help`.
"""

LONE_JOB = """## Where a lone job's time goes

One client, one job at a time, the stack idle otherwise: legs from the job record's timestamps
(`created`, `started`, `finished`, whole milliseconds, so each leg is ±1 ms) and the client, p50
(the two repeats), in two full runs of the same code on this machine: 2026-11-28 19:57 (commit
915f392) and 21:10, the run of the tables above. The machine was slower in the second: the MLP
alone took 2.08 ms for a batch of one against 1.65 ms, and 2,934 rows/s at batch 64 against
4,858.

| leg (ms) | synthetic (12 ms model), 19:57 | synthetic, 21:10 | MLP, 19:57 | MLP, 21:10 |
|---|---|---|---|---|
| client to the job written (HTTP in, validation, SUBMIT) | < 0.5 | < 0.5 | < 0.5 | < 0.5 |
| written to started (batcher, CORK, DISPATCH, Celery, START) | 2 | 3-4 | 2 | 3-4 |
| started to finished (the stages, the final write) | 13 | 13-14 | 3 | 4 |
| final write to the client (PUBLISH, waiter, HTTP out) | 1.8-2.1 | 2.8-3.0 | 1.3-1.5 | 2.6-3.0 |
| the workers' own `predict` (their reports, from 21:10) | | 12.13-12.16 | | 2.99-3.20 |
| end to end | 16.3-17.1 | 19.6-21.0 | 5.3-6.1 | 10.2-11.8 |

The CPU this cost, per job (every process of the stack, the MLP): 5.8-6.5 ms in all at 19:57,
of which the two workers 3.2-3.5 ms, the batcher 0.9-1.1, the gateway 0.7-1.0 and Redis 0.9-1.0;
BentoML's lone request cost 7.1-7.8 ms of CPU in the same run (its p50: 3.5-3.8 ms). At 21:10,
10.6-12.2 ms in all (workers 5.2-5.7, batcher 2.2-2.5, gateway 1.6-2.3, Redis 1.5-1.7) against
BentoML's 9.4-11.8 ms (its p50: 4.5-5.7 ms). On the slower machine the stack's own legs grew by
more than the model did: every one of its four processes paid for the slower CPU, BentoML's one
process once.

The MLP's `predict` inside the stack took 3.0-3.2 ms (p50 of 661-764 batches of one per run)
where the model alone, in a hot loop, took 2.25 ms through `predict` in the same run. Probed by
hand in this session: a forward pass that follows an idle gap is slower than one that follows
another (on this machine 2.0 ms back to back, 2.3-2.6 ms after 5-20 ms asleep); running two
copies of the weights in turn instead of one made no difference (so lane choice cannot keep a
worker's weights in cache), and neither did huge pages for the weights
(`THP_MEM_ALLOC_ENABLE=1`). The target of a batch of one plus 3 ms counts the model at its
hot-loop time; inside any server that waits for its next request, part of that 3 ms goes to
the model.

Finer, from sub-millisecond stamps added by hand for one run and taken out again: the MLP, one
client, `Prefer: wait`, `asyncinfer up` as it comes (Redis with `appendfsync always`), p50 of
1,429 jobs. The gateway's handler saw 6.25 ms from its start to its answer; the client 6.86 ms.

| leg | p50 |
|---|---|
| gateway: read and parse the body, validate, SUBMIT (one script, fsynced) | 0.79 ms |
| the entry reaches the batcher (its blocking XREADGROUP returns) | 0.06 ms |
| CORK's decision and the choice of a lane | 0.23 ms |
| DISPATCH: the Celery message (40 µs to build) and one fenced script, fsynced | 0.90 ms |
| Celery: the worker's BRPOP returns, to the task's body | 0.25 ms |
| the task hands the batch to the worker's event-loop thread | 0.41 ms |
| START (one script, fsynced) | 0.60 ms |
| compute-thread hop, preprocess, predict, postprocess | 2.16 ms |
| final write with the lane report; its publish reaches the waiting gateway | 0.88 ms |

So a lone job costs its model plus 5-7 ms here, against the 3 ms issue 16 asks for. The last
leg lost a whole round trip in this change: redis-py sends `SCRIPT EXISTS` before executing any
pipeline that holds a Script object, and a lone job's final write was such a pipeline (its lane
report rides with it); the script is now queued as a plain `EVALSHA` and loaded by hand on
`NOSCRIPT`. The client's p50 in the instrumented run went from 8.05 to 6.86 ms. Removed before
(each measured): the pool-thread hop (a `solo` pool with a hand-over task), a compute-thread hop
per stage for a one-job batch, the lane report's own round trip, Celery's ack of each batch (the
worker's queue is consumed without acks, and its task's request sends none), `saferepr` of every
batch's job ids, and asyncio's loop for uvloop's.

What is left is structural. Four writes each wait for an fsync before Redis answers (an `INCR`
takes 0.26 ms here against 0.10 ms for a `PING`, from asyncio): that is the price of an
answered 202 surviving a kill of Redis, and Redis 7.0 has no `WAITAOF` to fsync the submit
alone. Tried and dropped, no change measured: a shorter GIL switch interval in the worker, and
yielding the GIL after the hand-over to the event-loop thread. A job crosses four processes, five
Redis round trips and three threads of the worker on two shared cores; BentoML's lone request is
one HTTP call into the process that runs the model. It also costs CPU: at 10% load (batches of
one) the stack spent about 10 ms of CPU per job here (the workers 6 ms for a 1.45 ms model,
batcher and gateway 1.6 ms each, Redis 1.35 ms) against BentoML's 5.7 ms, so from a quarter of
its saturation the two cores queue every leg; the worker's per-batch CPU is the next lead.

Built since, for that lead: a lone batch skips the event loop (`workers/direct.py`). When the
worker holds no other batch, Celery's thread hands a one-job batch straight to the compute
thread, which runs START, the stages and the final write with its lane report itself, through a
blocking client: one cross-thread hop instead of four. Anything else, a START that finds no job
to run or fails, and a final write that fails, goes back to the event loop's path (which rides
out Redis outages); a hung predict there is given up by the heartbeat's watchdog. The two paths
side by side, in process, against a private Redis that fsyncs every write and without Celery
(steadier than the end-to-end runs above):

{lone_batch}

Less than the 0.7 ms estimated above, in three sittings 0.13 to 0.30 ms (4-8%) and 6-8% of the
CPU. End to end, one client on `asyncinfer up`, the gain was inside this machine's run-to-run
noise (the p50 of the same code moved by ±1 ms between repeats).

## Hot path, second round

`python -m bench.profile_hotpath --before <the previous commit> --repeats 2` (medians of
alternating runs, same machine, same session; raw JSON in
[bench-data/cpu/hotpath/](bench-data/cpu/hotpath/)). Found with py-spy and `INFO commandstats`:
the submit body's check for numbers beyond a float's range ran one regex over the whole body
(90 µs for the MLP's 5 KB of floats, more than the JSON parse); each submit refreshed the expiry
of all three due sets (3 `PTTL` + 3 `PEXPIREAT`); the final write removed a started job from
its due set a second time; and every batch still paid Celery's ack round trip.

| figure | before | after |
|---|---|---|
| gateway alone: submits/s (C=64) | 3,824 | 4,359 |
| gateway alone: gateway CPU µs per submit | 248 | 219 |
| gateway alone: Redis commands per submit | 16.03 | 11.02 |
| stack: jobs/s (C=64, submit + long-poll) | 1,113 | 1,165 |
| stack: gateway CPU µs per job | 497 | 466 |
| stack: worker CPU µs per job | 588 | 551 |
| stack: Redis CPU µs per job | 190 | 179 |
| stack: Redis commands per job (all) | 35.03 | 28.78 |

The dispatch protocol, deadlines and ETAs cost commands of their own that stay: a fenced
dispatch checks each entry's owner (`XPENDING`) and moves it (`XCLAIM`), the start checks the
owner again and resets the entry's idle time, and a submit ranks the job in its due set
(`ZADD`, `ZCOUNT`, `ZCARD`) for its ETA and admission.
"""

def lone_batch_table(res: dict[str, Any] | None) -> str:
    """The table of `python -m bench.lone_batch` (docs/bench-data/cpu/lone-batch.json)."""
    if res is None:
        return "(run `python -m bench.lone_batch` to measure.)"
    loop, direct = res["ways"]["loop"], res["ways"]["direct"]
    rows = "\n".join(
        f"| {label} | {w['p50_ms']:.2f} ms | {w['p90_ms']:.2f} ms | {w['cpu_ms']:.2f} ms |"
        for label, w in (("event loop's path (`run_batch`)", loop),
                         ("direct path (`workers.direct`)", direct)))
    return (f"Measured {res['at']} on {res['cpus']} CPUs, {res['rounds']} lone MLP batches per "
            "path, alternating (`python -m bench.lone_batch`; raw JSON in "
            "[bench-data/cpu/lone-batch.json](bench-data/cpu/lone-batch.json)): from the "
            "hand-over by the calling thread to the final write's reply, and the process's CPU "
            "over that time.\n\n"
            "| path | p50 | p90 | CPU per batch |\n|---|---|---|---|\n"
            f"{rows}\n\nThe direct path takes {direct['p50_ms'] / loop['p50_ms']:.0%} of the "
            f"loop's p50 and {direct['cpu_ms'] / loop['cpu_ms']:.0%} of its CPU per batch.")


PROFILE_START, PROFILE_END = "<!-- profile-table -->", "<!-- /profile-table -->"

PROFILING = """## Hot path, first round (measured for an earlier change)

Profiled with py-spy (`python -m bench.profile_hotpath --spy`: the gateway alone under a
closed-loop submit load, then the whole stack under the job pattern, each process sampled),
timed in-process piece by piece, and counted with Redis `INFO commandstats`. What was found and
changed, largest first:

- **Celery's threads pool left the next batch waiting (celery/celery#6941).** With prefetch
  off, the worker takes its next message only on an iteration of its event loop, and a task
  finishing in a pool thread does not wake it; with task events off each batch waited for a
  timer tick (about 2 s), and with them on the events' flush happened to wake it. The worker
  then ran a pool that woke the loop when a task's completion was recorded; since the dispatch
  protocol it runs Celery's `solo` pool with a task that only hands the batch to the worker's
  I/O loop and returns, so the loop is never blocked at all.
- **Celery task events only when watched.** They cost the batcher and the worker a Redis
  publish per task. Flower turns them on by itself (its `enable_events` timer) while it runs;
  `ASYNCINFER_TASK_EVENTS=true` keeps them on for other monitors.
- **The gateway's Redis calls go through one pipelined connection** (`shared/muxredis.py`):
  redis-py's per-command machinery (pool checkout, timeouts, retry wrapper, Python packing)
  was about a third of the gateway's CPU per job. Commands are packed by hiredis, written
  together once per event-loop iteration, and answered in order.
- **A long-poll needs no Redis read.** The finish script publishes the final record with the
  id; jobs this gateway submitted are watched from before their submit, so a long-poll on one
  answers from the message (or waits for it) with no `HGETALL`; anything else reads as before.
- **One script call per batch** for the worker's start and finish (was one per job, pipelined).
- **The two job routes are plain Starlette routes** (FastAPI's parameter solving cost about
  30 µs per request) and FastAPI's OpenTelemetry hooks are off; responses are encoded with
  pydantic-core. The bare server in these benchmarks is built the same way.
- **Only the model's thread is pinned to the worker's core**; the Celery consumer and the Redis
  I/O loop float (pinning the whole process made them queue behind the model on its core).
- Earlier (previous change): submit is one `EVALSHA`; the body is parsed once by pydantic-core;
  per-item pre/postprocess use at most 4 thread lanes per batch.

Commands per job (commandstats over the stack run below, which counts the commands a script
runs too): 1.1 `evalsha` (the submit, plus the worker's two per batch) and one `hgetall`, inside
the finish script, which reads the record it publishes; before, the gateway read each record
1.8 times per job. In all, 20.9 commands per job instead of 27.4.

Before/after, measured by `python -m bench.profile_hotpath --before <copy of the code before
these changes> --repeats 2 --write-docs` (medians of alternating runs, same machine, same
session). The in-process rows are steady; the end-to-end rows ran on a shared machine:

{profile_table}
"""


def profile_section(docs: Path) -> str:
    """The hot-path section with the before/after table already in docs/benchmarks.md."""
    path = docs / "benchmarks.md"
    old = path.read_text() if path.exists() else ""
    if PROFILE_START in old and PROFILE_END in old:
        body = old[old.index(PROFILE_START) + len(PROFILE_START):old.index(PROFILE_END)]
        table = f"{PROFILE_START}{body}{PROFILE_END}"
    else:
        table = (f"{PROFILE_START}\n(run `python -m bench.profile_hotpath` to measure.)\n"
                 f"{PROFILE_END}")
    return PROFILING.replace("{profile_table}", table)
