"""The discrete-event simulator: traces, determinism, protocol checks, and CORK vs the reference."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable

import pytest

from batcher.cork import CorkPolicy
from batcher.policy import Clock, Decision, Pending, PolicyConfig, PolicySnapshot, Release, Wait
from batcher.simulate import (
    POLICIES,
    CostModel,
    SimulationError,
    deadline_burst,
    main,
    make_trace,
    simulate,
)

COST = CostModel(a_s=0.002, b_s=0.020, noise=0.1)


def test_traces_have_the_asked_rate_and_shape() -> None:
    poisson = make_trace("poisson", 200.0, 10.0, seed=1)
    assert 1800 < len(poisson) < 2200
    assert all(x.t_s <= y.t_s for x, y in itertools.pairwise(poisson))
    bursts = make_trace("bursts", 200.0, 10.0, seed=1, burst_size=8)
    assert set(Counter(a.t_s for a in bursts).values()) == {8}
    onoff = make_trace("onoff", 200.0, 10.0, seed=1, period_s=2.0, duty=0.25)
    assert all(a.t_s % 2.0 < 0.5 for a in onoff)
    assert 1700 < len(onoff) < 2300
    mixed = make_trace("poisson", 500.0, 2.0, seed=1, priorities=(1.0, 1.0, 1.0))
    assert set(Counter(a.priority for a in mixed)) == {"high", "normal", "low"}
    with pytest.raises(ValueError):
        make_trace("square", 1.0, 1.0, seed=1)


def test_capacity_counts_full_batches_on_every_slot() -> None:
    assert COST.capacity_rps(32, 2) == pytest.approx(2 * 32 / (0.002 * 32 + 0.020))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_same_seed_same_result_and_every_request_accounted_for(name: str) -> None:
    config = PolicyConfig(max_batch_size=16, max_latency_ms=100.0, on_overload="shed")
    trace = make_trace("poisson", 1.3 * COST.capacity_rps(16, 2), 2.0, seed=5)
    first = simulate(POLICIES[name], trace, COST, config, slots=2, seed=5)
    again = simulate(POLICIES[name], trace, COST, config, slots=2, seed=5)
    assert first == again
    shed = round((first.shed_share + first.expired_share) * first.requests)
    assert first.completed + shed == first.requests


def test_cork_beats_the_reference_on_p99_and_late_share_at_a_moderate_load() -> None:
    config = PolicyConfig(max_batch_size=32, max_latency_ms=120.0, on_overload="shed")
    for seed in (1, 2, 3):
        trace = make_trace("poisson", 0.7 * COST.capacity_rps(32, 2), 5.0, seed=seed)
        ours = simulate(POLICIES["cork"], trace, COST, config, slots=2, seed=seed)
        ref = simulate(POLICIES["reference"], trace, COST, config, slots=2, seed=seed)
        assert ours.p99_ms < ref.p99_ms
        assert ours.late_share < ref.late_share
        assert ours.p99_ms <= 120.0


def test_light_load_batches_stay_small_and_fast() -> None:
    config = PolicyConfig(max_batch_size=32, max_latency_ms=200.0)
    trace = make_trace("poisson", 2.0, 60.0, seed=2)  # a request every 500 ms
    result = simulate(POLICIES["cork"], trace, COST, config, slots=1, seed=2)
    assert result.mean_batch_rows == 1.0
    assert result.p99_ms < 1000 * 1.5 * (0.002 + 0.020)  # no waiting for company


def test_expired_requests_are_counted_apart() -> None:
    config = PolicyConfig(max_batch_size=32, max_latency_ms=10_000.0)
    trace = make_trace("poisson", 2 * COST.capacity_rps(32, 1), 2.0, seed=3, ttl_s=0.5)
    result = simulate(POLICIES["cork"], trace, COST, config, slots=1, seed=3)
    assert result.expired_share > 0.1
    # What completed was dispatched before its ttl ran out.
    assert result.p99_ms < 1000 * (0.5 + 1.5 * (0.002 * 32 + 0.020))


class _Greedy:
    """Breaks the protocol: releases whatever the free slot count says."""

    def __init__(self, config: PolicyConfig, clock: Clock, slots: int) -> None:
        self.queue: list[Pending] = []

    def add(self, item: Pending) -> None:
        self.queue.append(item)

    def remove(self, entry_ids: Iterable[str]) -> list[Pending]:
        return []

    def decide(self, free_slots: int, lanes: int | None = None) -> Decision:
        if not self.queue:
            return Wait(None)
        return Release(str(len(self.queue)), (self.queue.pop(),), "rogue")

    def on_complete(self, batch_id: str, rows: int, duration_s: float,
                    overhead_s: float | None = None) -> None:
        pass

    def forget(self, batch_id: str) -> None:
        pass

    def answer_leg(self, seconds: float) -> None:
        pass

    def predict_s(self, rows: int) -> float:
        return 0.0

    def batch_cost_s(self, rows: int) -> float:
        return 0.0

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(None, None, 0.0, 0, len(self.queue), len(self.queue))

    @property
    def queue_rows(self) -> int:
        return len(self.queue)


def test_a_release_without_a_free_slot_is_a_protocol_error() -> None:
    trace = make_trace("bursts", 100.0, 1.0, seed=1, burst_size=4)
    with pytest.raises(SimulationError):
        simulate(_Greedy, trace, COST, PolicyConfig(), slots=1)


def test_the_policy_is_driven_only_through_the_protocol() -> None:
    seen: list[str] = []

    def factory(config: PolicyConfig, clock: Clock, slots: int) -> CorkPolicy:
        policy = CorkPolicy(config, clock)
        decide = policy.decide

        def spy(free_slots: int, lanes: int | None = None) -> Decision:
            decision = decide(free_slots, lanes)
            seen.append(type(decision).__name__)
            assert free_slots >= 0
            return decision

        policy.decide = spy  # type: ignore[method-assign]
        return policy

    trace = make_trace("onoff", 300.0, 3.0, seed=4)
    simulate(factory, trace, COST, PolicyConfig(max_latency_ms=150.0), slots=2, seed=4)
    assert {"Release", "Wait"} <= set(seen)


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--policy" in capsys.readouterr().out
    assert main(["--policy", "fixed", "--seconds", "1", "--load", "0.3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] > 0 and "p99_ms" in result


def test_a_burst_of_tight_deadlines_in_a_backlog_meets_them_with_edf_not_with_fifo() -> None:
    cost = CostModel(a_s=0.002, b_s=0.020, noise=0.1, lead_s=0.003, tail_s=0.002)
    config = PolicyConfig(max_batch_size=32, max_latency_ms=5000.0)
    met = {}
    def factory(edf: bool) -> Callable[[PolicyConfig, Clock, int], CorkPolicy]:
        return lambda c, clk, _: CorkPolicy(c, clk, edf=edf)

    for name, edf in (("edf", True), ("fifo", False)):
        shares = []
        for seed in (1, 2, 3):
            trace = deadline_burst(cost, 32, seed=seed)
            result = simulate(factory(edf), trace, cost, config, slots=1, seed=seed)
            shares.append(result.deadline_met_share)
        met[name] = sum(shares) / len(shares)
    assert met["edf"] >= 0.9 and met["fifo"] <= 0.3, met


def test_shed_mode_keeps_served_jobs_within_the_budget_up_to_twice_capacity() -> None:
    cost = CostModel(a_s=0.002, b_s=0.010, noise=0.05, lead_s=0.005, tail_s=0.003)
    config = PolicyConfig(max_batch_size=32, max_latency_ms=200.0, on_overload="shed")
    capacity = cost.capacity_rps(32, 1)
    goodput = {}
    for load in (0.5, 1.0, 1.5, 2.0):
        trace = make_trace("poisson", load * capacity, 10.0, seed=1)
        result = simulate(POLICIES["cork"], trace, cost, config, slots=1, seed=1)
        assert result.p99_ms <= 200.0 * 1.02, (load, result)
        goodput[load] = result.throughput_rps * (1 - result.late_share)
    assert goodput[2.0] >= 0.9 * max(goodput.values()), goodput
