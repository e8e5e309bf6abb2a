"""Discrete-event simulator: replay an arrival trace against a batching policy and k workers.

It models what the live batcher does: the policy is driven only through the `BatchingPolicy`
protocol on a simulated clock, and the lanes it is offered come from the same
`batcher.capacity.Capacity` the batcher uses. A dispatched batch reaches its worker `lead_s`
later (hand-off, fetch, preprocess), waits there for a lane if the one before it has not
finished, holds the lane for its predict, `a·n + b` seconds (times an optional random factor),
reports its lane free at the predict's end, and its jobs finish `tail_s` after that
(postprocess, final write). Same seed, same result. Run `python -m batcher.simulate --help`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from batcher.baselines import FixedWindow, NoBatching, ReferenceCork
from batcher.capacity import Capacity, WorkerInfo
from batcher.cork import CorkPolicy
from batcher.policy import BatchingPolicy, Clock, Pending, PolicyConfig, Priority, Release, Shed

PolicyFactory = Callable[[PolicyConfig, Clock, int], BatchingPolicy]

POLICIES: dict[str, PolicyFactory] = {
    "cork": lambda cfg, clock, slots: CorkPolicy(cfg, clock),
    "reference": lambda cfg, clock, slots: ReferenceCork(cfg, clock, workers=slots),
    "reference-rr": lambda cfg, clock, slots: ReferenceCork(
        cfg, clock, workers=slots, assign="round_robin"
    ),
    "fixed": lambda cfg, clock, slots: FixedWindow(cfg, clock, window_ms=10.0),
    "none": lambda cfg, clock, slots: NoBatching(cfg, clock),
}


class SimulationError(RuntimeError):
    """The policy broke the protocol (released with no free slot, or never waits)."""


@dataclass(frozen=True)
class Arrival:
    t_s: float
    rows: int = 1
    priority: Priority = "normal"
    ttl_s: float | None = None
    deadline_s: float | None = None  # relative to t_s, like a submit's deadline_ms


def make_trace(
    kind: str,
    rate_hz: float,
    duration_s: float,
    seed: int,
    *,
    burst_size: int = 16,
    period_s: float = 2.0,
    duty: float = 0.5,
    priorities: tuple[float, float, float] = (0.0, 1.0, 0.0),
    ttl_s: float | None = None,
) -> list[Arrival]:
    """Arrivals averaging `rate_hz` over `duration_s`.

    poisson: exponential gaps. bursts: `burst_size` requests at one instant, bursts Poisson.
    onoff: a square wave, Poisson at rate/duty during the first `duty` of each period, silent
    otherwise. `priorities` weighs high/normal/low; `ttl_s` gives every request a ttl."""
    rng = random.Random(seed)
    levels: tuple[Priority, ...] = ("high", "normal", "low")
    times: list[float] = []
    if kind == "poisson":
        t = rng.expovariate(rate_hz)
        while t < duration_s:
            times.append(t)
            t += rng.expovariate(rate_hz)
    elif kind == "bursts":
        t = rng.expovariate(rate_hz / burst_size)
        while t < duration_s:
            times.extend([t] * burst_size)
            t += rng.expovariate(rate_hz / burst_size)
    elif kind == "onoff":
        t = rng.expovariate(rate_hz / duty)
        while t < duration_s:
            if (t % period_s) < duty * period_s:
                times.append(t)
            t += rng.expovariate(rate_hz / duty)
    else:
        raise ValueError(f"unknown trace kind {kind!r}")
    return [Arrival(t, 1, rng.choices(levels, priorities)[0], ttl_s) for t in times]


def deadline_burst(cost: CostModel, max_batch_size: int, *, backlog_s: float = 1.0,
                   burst: int = 32, slack: float = 3.0, seed: int = 0) -> list[Arrival]:
    """A backlog of loose jobs (no deadline: due at arrival + max_latency_ms) arriving at
    twice the capacity of one worker for `backlog_s`, and, a third of the way in, a burst of
    `burst` jobs whose deadline is `slack` times one full batch's time."""
    rng = random.Random(seed)
    rate = 2 * cost.capacity_rps(max_batch_size, 1)
    loose = [Arrival(i / rate) for i in range(int(rate * backlog_s))]
    tight_s = slack * (cost.a_s * max_batch_size + cost.b_s)
    at = backlog_s / 3
    tight = [Arrival(at + rng.uniform(0, 0.005), deadline_s=tight_s) for _ in range(burst)]
    return sorted(loose + tight, key=lambda a: a.t_s)


@dataclass(frozen=True)
class CostModel:
    """Predict duration `a·rows + b` seconds, times a log-normal factor of relative spread
    `noise`; `lead_s` from dispatch to the worker being ready to predict, `tail_s` from the
    predict's end to the jobs being final."""

    a_s: float
    b_s: float
    noise: float = 0.0
    lead_s: float = 0.0
    tail_s: float = 0.0

    def duration(self, rows: int, rng: random.Random) -> float:
        base = self.a_s * rows + self.b_s
        if self.noise <= 0:
            return base
        return base * math.exp(rng.gauss(-self.noise**2 / 2, self.noise))

    def capacity_rps(self, max_batch_size: int, slots: int) -> float:
        """Rows per second with every slot busy on full batches."""
        return slots * max_batch_size / (self.a_s * max_batch_size + self.b_s)


@dataclass(frozen=True)
class SimResult:
    """What one run measured. Latency is arrival to completion; shares are of all requests."""

    requests: int
    completed: int
    throughput_rps: float
    mean_batch_rows: float
    p50_ms: float
    p99_ms: float
    late_share: float
    shed_share: float
    expired_share: float
    deadline_met_share: float  # of the requests with a deadline: finished within it
    decide_calls: int
    makespan_s: float


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    factory: PolicyFactory,
    arrivals: Sequence[Arrival],
    cost: CostModel,
    config: PolicyConfig,
    slots: int,
    seed: int = 0,
    *,
    lanes: int = 1,
) -> SimResult:
    """Run the trace on `slots` workers of `lanes` lanes each until every request completed,
    was shed or expired, and measure it."""
    rng = random.Random(seed)
    clock = _Clock()
    policy = factory(config, clock, slots * lanes)
    capacity = Capacity(cost.lead_s)
    workers = [f"w{i}" for i in range(slots)]
    capacity.sync([WorkerInfo(w, lanes, True) for w in workers], 0.0)
    lane_free_at = {w: [0.0] * lanes for w in workers}
    finish_at: dict[str, float] = {}
    dropped: dict[str, str] = {}
    # Reports (predict end, seq, worker, release, dispatch time, lane wait); at equal times a
    # report is handled before an arrival, so the arrival already sees the freed lane.
    running: list[tuple[float, int, str, Release, float, float]] = []
    calls, batches, rows_out, index, stalled = 0, 0, 0, 0, 0
    wake: float | None = None
    while True:
        t_arrival = arrivals[index].t_s if index < len(arrivals) else math.inf
        t_done = running[0][0] if running else math.inf
        now = min(t_arrival, t_done, math.inf if wake is None else wake)
        if math.isinf(now):
            break
        stalled = stalled + 1 if now <= clock.now else 0
        if stalled > 10_000:
            raise SimulationError(f"no progress at t={clock.now:.6f}")
        clock.now = max(clock.now, now)
        if t_done == now:
            end, _, worker, done, dispatched, waited = heapq.heappop(running)
            capacity.reported(worker, done.batch_id, clock.now)
            predict = end - dispatched - cost.lead_s - waited
            policy.on_complete(done.batch_id, done.rows, predict, cost.lead_s + cost.tail_s)
        elif t_arrival == now:
            arr = arrivals[index]
            expires = None if arr.ttl_s is None else arr.t_s + arr.ttl_s
            deadline = None if arr.deadline_s is None else arr.t_s + arr.deadline_s
            key = f"r{index}"
            policy.add(Pending(key, key, arr.rows, arr.priority, arr.t_s, expires, deadline))
            index += 1
        else:
            wake = None
        while True:  # the protocol: keep deciding while the policy releases or sheds
            decision = policy.decide(capacity.free_lanes(clock.now), capacity.lanes)
            calls += 1
            if isinstance(decision, Release):
                chosen = capacity.pick(clock.now)
                if chosen is None:
                    raise SimulationError(f"release with no free lane at t={clock.now:.6f}")
                batches, rows_out = batches + 1, rows_out + decision.rows
                capacity.dispatched(chosen, decision.batch_id, clock.now,
                                    policy.predict_s(decision.rows))
                lanes_of = lane_free_at[chosen]
                lane = min(range(lanes), key=lanes_of.__getitem__)
                ready = clock.now + cost.lead_s
                start = max(ready, lanes_of[lane])
                end = start + cost.duration(decision.rows, rng)
                lanes_of[lane] = end
                for e in decision.entries:
                    finish_at[e.entry_id] = end + cost.tail_s
                heapq.heappush(running, (end, batches, chosen, decision, clock.now,
                                         start - ready))
            elif isinstance(decision, Shed):
                for e in decision.entries:
                    dropped[e.entry_id] = decision.reason
            else:
                wake = _earliest(decision.until_s, capacity.next_change_s(clock.now))
                break
    if policy.queue_rows:
        raise SimulationError(f"{policy.queue_rows} rows left queued with nothing to wake them")
    return _measure(arrivals, config, finish_at, dropped, calls, batches, rows_out)


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _measure(
    arrivals: Sequence[Arrival],
    config: PolicyConfig,
    finish_at: dict[str, float],
    dropped: dict[str, str],
    calls: int,
    batches: int,
    rows_out: int,
) -> SimResult:
    total = max(1, len(arrivals))
    latencies = sorted(
        finish_at[f"r{i}"] - a.t_s for i, a in enumerate(arrivals) if f"r{i}" in finish_at
    )
    makespan = max([a.t_s for a in arrivals[-1:]] + list(finish_at.values()) + [1e-9])
    budget_s = config.max_latency_ms / 1000.0
    reasons = list(dropped.values())
    with_deadline = [(i, a) for i, a in enumerate(arrivals) if a.deadline_s is not None]
    met = sum(1 for i, a in with_deadline if f"r{i}" in finish_at
              and finish_at[f"r{i}"] - a.t_s <= (a.deadline_s or 0.0))
    return SimResult(
        requests=len(arrivals),
        completed=len(latencies),
        throughput_rps=len(latencies) / makespan,
        mean_batch_rows=rows_out / batches if batches else 0.0,
        p50_ms=1000.0 * _quantile(latencies, 0.50),
        p99_ms=1000.0 * _quantile(latencies, 0.99),
        late_share=sum(1 for x in latencies if x > budget_s) / total,
        shed_share=reasons.count("overloaded") / total,
        expired_share=(reasons.count("expired") + reasons.count("deadline_exceeded")) / total,
        deadline_met_share=met / len(with_deadline) if with_deadline else 1.0,
        decide_calls=calls,
        makespan_s=makespan,
    )


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; 0 for no data."""
    if not ordered:
        return 0.0
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: one simulated run, printed as text or JSON."""
    p = argparse.ArgumentParser(prog="python -m batcher.simulate", description=__doc__)
    p.add_argument("--policy", choices=sorted(POLICIES), default="cork")
    p.add_argument("--trace", choices=("poisson", "bursts", "onoff"), default="poisson")
    p.add_argument("--load", type=float, default=0.5, help="arrival rate / capacity")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the trace")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--a-ms", type=float, default=2.0, help="per-row cost")
    p.add_argument("--b-ms", type=float, default=20.0, help="fixed cost per batch")
    p.add_argument("--noise", type=float, default=0.0, help="relative spread of durations")
    p.add_argument("--slots", type=int, default=2, help="workers")
    p.add_argument("--lanes", type=int, default=1, help="predicts at once per worker")
    p.add_argument("--lead-ms", type=float, default=0.0, help="dispatch to predict start")
    p.add_argument("--tail-ms", type=float, default=0.0, help="predict end to jobs final")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-latency-ms", type=float, default=250.0)
    p.add_argument("--on-overload", choices=("queue", "shed"), default="shed")
    p.add_argument("--burst-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    config = PolicyConfig(args.max_batch_size, args.max_latency_ms, args.on_overload)
    cost = CostModel(args.a_ms / 1000.0, args.b_ms / 1000.0, args.noise, args.lead_ms / 1000.0,
                     args.tail_ms / 1000.0)
    rate = args.load * cost.capacity_rps(args.max_batch_size, args.slots * args.lanes)
    trace = make_trace(args.trace, rate, args.seconds, args.seed, burst_size=args.burst_size)
    result = simulate(POLICIES[args.policy], trace, cost, config, args.slots, args.seed,
                      lanes=args.lanes)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(f"{args.policy} at {rate:.1f} req/s ({args.load:.0%} of capacity), {args.trace}:")
        for name, value in asdict(result).items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"  {name:16} {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
