"""CorkPolicy driven by hand on a fake clock: every rule of DESIGN section 4, one test each."""

from __future__ import annotations

import logging

import pytest

from batcher.cork import CorkPolicy
from batcher.policy import Pending, PolicyConfig, Priority, Release, Shed, Wait

A, B = 0.002, 0.020  # the model behind every completion below: 2 ms per row + 20 ms


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def item(key: str, at: float, rows: int = 1, priority: Priority = "normal",
         expires: float | None = None) -> Pending:
    return Pending(key, key, rows, priority, at, expires)


def make(clock: FakeClock, **config: object) -> CorkPolicy:
    return CorkPolicy(PolicyConfig(**config), clock)  # type: ignore[arg-type]


def calibrate(p: CorkPolicy, clock: FakeClock) -> None:
    """Run the start-up probes against the A, B model, drain, and leave a long silence."""
    for i in range(20):
        if p.snapshot().extra["calibrated"]:
            break
        clock.now += 1.0
        for j in range(3):
            p.add(item(f"cal{i}.{j}", clock.now))
        d = p.decide(1)
        assert isinstance(d, Release) and d.reason == "probe"
        p.on_complete(d.batch_id, d.rows, A * d.rows + B)
    assert p.snapshot().extra["calibrated"]
    while p.queue_rows:
        d = p.decide(8)
        if isinstance(d, Release):
            p.on_complete(d.batch_id, d.rows, A * d.rows + B)
        else:
            clock.now += 1.0
    clock.now += 10.0


def release(d: object) -> Release:
    assert isinstance(d, Release), d
    return d


def test_probes_cap_the_first_batches_at_1_1_1_2_3_rows() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=32)
    for i in range(40):
        p.add(item(f"r{i}", clock.now))
    sizes = []
    for _ in range(6):
        d = release(p.decide(1))
        sizes.append(d.rows)
        clock.now += 0.1
        p.on_complete(d.batch_id, d.rows, A * d.rows + B)
    assert sizes == [1, 1, 1, 2, 3, 32]
    snap = p.snapshot()
    assert snap.a_s == pytest.approx(A) and snap.b_s == pytest.approx(B)


def test_at_light_load_a_probe_waits_for_its_rows_so_the_fit_sees_1_2_3() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=32, max_latency_ms=200.0)
    sizes = []
    for i in range(40):  # 25 jobs/s, one at a time, each batch done before the next arrival
        p.add(item(f"r{i}", clock.now))
        d = p.decide(1)
        if isinstance(d, Release):
            sizes.append(d.rows)
            p.on_complete(d.batch_id, d.rows, A * d.rows + B)
        else:
            assert isinstance(d, Wait) and d.until_s is not None
            assert d.until_s <= clock.now + 0.1  # at most half the budget
        clock.now += 0.040
    assert sizes[:5] == [1, 1, 1, 2, 3]
    snap = p.snapshot()
    assert snap.a_s == pytest.approx(A) and snap.b_s == pytest.approx(B)


def test_a_trickle_is_never_held_for_a_probe() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=32, max_latency_ms=200.0)
    for i in range(10):  # one request every 500 ms
        p.add(item(f"r{i}", clock.now))
        d = release(p.decide(1))
        p.on_complete(d.batch_id, d.rows, A * d.rows + B)
        clock.now += 0.5


def test_lone_request_at_light_load_is_released_at_once() -> None:
    clock = FakeClock()
    p = make(clock)
    calibrate(p, clock)
    for free in (1, 2):
        p.add(item(f"lone{free}", clock.now))
        d = release(p.decide(free))
        assert [e.entry_id for e in d.entries] == [f"lone{free}"]
        clock.now += 5.0


def test_no_release_when_no_slot_is_free() -> None:
    clock = FakeClock()
    for mode in ("queue", "shed"):
        p = make(clock, max_batch_size=4, on_overload=mode)
        calibrate(p, clock)
        for i in range(20):
            p.add(item(f"r{i}", clock.now))
        for _ in range(5):
            assert not isinstance(p.decide(0), Release)
            clock.now += 0.01


def test_a_batch_never_exceeds_max_batch_size_rows() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=8)
    calibrate(p, clock)
    sizes = [3, 3, 3, 5, 2, 9, 1, 7, 8, 4]
    for i, rows in enumerate(sizes):
        p.add(item(f"r{i}", clock.now + i * 1e-3, rows=rows))
    seen: list[str] = []
    while p.queue_rows:
        d = release(p.decide(100))
        # Only an entry that is larger than the cap on its own may exceed it, and it goes alone.
        assert d.rows <= 8 or len(d.entries) == 1
        seen.extend(e.entry_id for e in d.entries)
    assert seen == [f"r{i}" for i in range(len(sizes))]  # and nobody overtook anybody


def test_higher_priority_first_and_fifo_within_a_priority() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=2)
    calibrate(p, clock)
    t = clock.now
    for key, prio, dt in [("n1", "normal", 0.001), ("l1", "low", 0.002), ("n2", "normal", 0.003),
                          ("h1", "high", 0.004), ("n3", "normal", 0.005), ("h2", "high", 0.006)]:
        p.add(item(key, t + dt, priority=prio))  # type: ignore[arg-type]
    clock.now = t + 0.007
    batches = [[e.entry_id for e in release(p.decide(10)).entries] for _ in range(3)]
    assert batches == [["h1", "h2"], ["n1", "n2"], ["n3", "l1"]]


def test_aging_lets_a_low_priority_request_through() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=1, aging_ms=100.0)
    calibrate(p, clock)
    t = clock.now
    p.add(item("low", t, priority="low"))
    for i in range(5):
        p.add(item(f"high{i}", t + 0.150 + i * 0.01, priority="high"))
    clock.now = t + 0.205  # the low one waited 2 aging periods: it now counts as high
    first = release(p.decide(1)).entries[0].entry_id
    assert first == "low"
    # Without aging it would wait behind every high request.
    q = make(clock, max_batch_size=1, aging_ms=1e9)
    calibrate(q, clock)
    t = clock.now
    q.add(item("low", t, priority="low"))
    q.add(item("high", t + 0.150, priority="high"))
    clock.now = t + 0.195
    assert release(q.decide(1)).entries[0].entry_id == "high"


def test_canceled_requests_never_reach_a_batch() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=32)
    calibrate(p, clock)
    for i in range(6):
        p.add(item(f"r{i}", clock.now))
    removed = p.remove(["r1", "r4", "nope"])
    assert [e.entry_id for e in removed] == ["r1", "r4"]
    assert p.queue_rows == 4
    released: list[str] = []
    while p.queue_rows:
        released.extend(e.entry_id for e in release(p.decide(4)).entries)
    assert released == ["r0", "r2", "r3", "r5"]


def test_an_entry_removed_and_queued_again_is_released_once() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=32)
    calibrate(p, clock)
    for i in range(4):
        p.add(item(f"r{i}", clock.now, expires=clock.now + 0.010))
    p.remove(["r1"])
    p.add(item("r1", clock.now, expires=clock.now + 60.0))  # redelivered with a longer ttl
    clock.now += 0.020
    shed = p.decide(0)
    assert isinstance(shed, Shed) and shed.reason == "expired"
    assert sorted(e.entry_id for e in shed.entries) == ["r0", "r2", "r3"]
    assert [e.entry_id for e in release(p.decide(1)).entries] == ["r1"]
    assert p.queue_rows == 0


def test_under_backlog_every_release_is_a_full_batch() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=16)
    calibrate(p, clock)
    for i in range(16 * 5 + 3):
        p.add(item(f"r{i}", clock.now + i * 1e-4))
    clock.now += 0.01
    assert [release(p.decide(5 - k)).rows for k in range(5)] == [16] * 5
    assert isinstance(p.decide(0), Wait)


def overloaded(clock: FakeClock, mode: str) -> tuple[CorkPolicy, float]:
    """A calibrated policy (L = 200 ms) with a full 32-row batch in flight since `t`."""
    p = make(clock, max_batch_size=32, max_latency_ms=200.0, on_overload=mode)
    calibrate(p, clock)
    t = clock.now
    for i in range(32):
        p.add(item(f"f{i}", t))
    assert release(p.decide(1)).rows == 32  # predicted to end at t + 84 ms
    return p, t


@pytest.mark.parametrize(("leg_s", "slack_s", "shed"), [
    (0.0, 0.001, False), (0.002, 0.001, True), (10.0, 0.049, True), (10.0, 0.051, False)])
def test_the_shed_plan_adds_the_answer_leg_up_to_a_quarter_of_the_budget(
        leg_s: float, slack_s: float, shed: bool) -> None:
    """The gateways' answer leg (shared.answerleg) is time the client waits after the final
    write: a job that makes its budget without it but not with it is shed. A leg past a quarter
    of the budget (50 ms here) counts as a quarter: a sick gateway must not make the model shed
    everything."""
    clock = FakeClock()
    p, t = overloaded(clock, "shed")
    p.answer_leg(leg_s)
    # Queued behind the in-flight batch: ends at t + 84 ms + 22 ms, then the leg.
    p.add(item("x", t + 0.084 + 0.022 - 0.200 + slack_s))
    clock.now = t + 0.010
    d = p.decide(0)
    if shed:
        assert isinstance(d, Shed) and d.reason == "overloaded"
        assert [e.entry_id for e in d.entries] == ["x"]
    else:
        assert isinstance(d, Wait)


def test_a_stalled_overhead_never_makes_the_plan_shed_everything() -> None:
    """One batch whose overhead was a stall (10 s) would, planned as is, shed every request; no
    batch would then complete to push it out of the window. The plan counts at most half the
    budget for overhead and answer leg together."""
    clock = FakeClock()
    p = make(clock, max_batch_size=32, max_latency_ms=200.0, on_overload="shed")
    calibrate(p, clock)
    clock.now += 1.0
    p.add(item("s", clock.now))
    d = release(p.decide(1))
    p.on_complete(d.batch_id, d.rows, A * d.rows + B, 10.0)
    p.answer_leg(10.0)
    clock.now += 1.0
    p.add(item("x", clock.now))  # a free lane: 22 ms of predict, 100 ms of overhead at most
    assert release(p.decide(1)).rows == 1


@pytest.mark.parametrize("margin", [-0.001, 0.001])
def test_shed_exactly_when_the_estimate_with_the_in_flight_remainder_crosses_the_budget(
    margin: float,
) -> None:
    clock = FakeClock()
    p, t = overloaded(clock, "shed")
    # Estimate for a request queued now behind the in-flight batch: t + 84 ms + 22 ms.
    arrived = t + 0.084 + 0.022 - 0.200 + margin
    p.add(item("x", arrived))
    clock.now = t + 0.010
    d = p.decide(0)
    if margin < 0:
        assert isinstance(d, Shed) and d.reason == "overloaded"
        assert [e.entry_id for e in d.entries] == ["x"]
    else:
        assert isinstance(d, Wait)
        # Without the in-flight batch it would run now and easily make it.
        assert isinstance(p.decide(1), Release)


def test_a_shed_falls_due_when_the_in_flight_batch_overruns() -> None:
    clock = FakeClock()
    p, t = overloaded(clock, "shed")
    p.add(item("x", t))  # deadline t + 200 ms; fine while the batch ends at t + 84 ms
    clock.now = t + 0.010
    d = p.decide(0)
    assert isinstance(d, Wait) and d.until_s is not None
    # If the in-flight batch is still running then, starting x now would end at the deadline.
    assert d.until_s == pytest.approx(t + 0.200 - 0.022)
    clock.now = d.until_s + 1e-3
    shed = p.decide(0)
    assert isinstance(shed, Shed) and shed.reason == "overloaded"


def test_queue_mode_never_sheds() -> None:
    clock = FakeClock()
    p, t = overloaded(clock, "queue")
    p.add(item("x", t - 10.0))
    clock.now = t + 0.010
    assert p.decide(0) == Wait(None)


def test_expired_requests_are_returned_as_shed_expired() -> None:
    clock = FakeClock()
    p = make(clock)
    calibrate(p, clock)
    t = clock.now
    p.add(item("soon", t, expires=t + 0.050))
    p.add(item("later", t, expires=t + 60.0))
    assert p.decide(0) == Wait(t + 0.050)  # no slot, but the expiry is a wake-up
    clock.now = t + 0.051
    d = p.decide(0)
    assert isinstance(d, Shed) and d.reason == "expired"
    assert [e.entry_id for e in d.entries] == ["soon"]
    assert [e.entry_id for e in release(p.decide(1)).entries] == ["later"]


def test_waiting_never_passes_the_latency_deadline() -> None:
    # b dominates and requests come every millisecond: holding for more rows pays, until
    # holding any longer would make the oldest request miss max_latency_ms.
    clock = FakeClock()
    p = CorkPolicy(PolicyConfig(max_batch_size=64, max_latency_ms=100.0), clock)

    def run(d: Release) -> None:
        p.on_complete(d.batch_id, d.rows, 0.0001 * d.rows + 0.060)

    for i in range(80):  # calibrate, and let the arrival estimate learn the 1 ms gaps
        clock.now += 0.001
        for j in range(3):
            p.add(item(f"w{i}.{j}", clock.now))
        d = p.decide(1)
        if isinstance(d, Release):
            run(d)
    while p.queue_rows:
        run(release(p.decide(2)))
    start = clock.now
    decision: object = None
    for i in range(100):
        clock.now = start + i * 0.001
        p.add(item(f"r{i}", clock.now))
        decision = p.decide(1)
        if isinstance(decision, Wait) and decision.until_s is not None:
            assert decision.until_s <= start + 0.100 - (0.0001 * (i + 2) + 0.060) + 1e-9
            if decision.until_s < start + (i + 1) * 0.001:  # the wake-up comes first: honour it
                clock.now = decision.until_s
                decision = p.decide(1)
        if isinstance(decision, Release):
            break
    batch = release(decision)
    assert batch.reason == "deadline" and batch.rows > 20
    assert clock.now + 0.0001 * batch.rows + 0.060 <= start + 0.100


def test_warns_once_when_a_one_row_batch_takes_the_whole_budget(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    p = make(clock, max_latency_ms=20.0)
    with caplog.at_level(logging.WARNING, logger="batcher.cork"):
        calibrate(p, clock)  # a + b = 22 ms >= 20 ms
        for i in range(3):
            p.add(item(f"r{i}", clock.now))
            d = release(p.decide(1))
            p.on_complete(d.batch_id, d.rows, A * d.rows + B)
    warning = p.snapshot().warning
    assert warning is not None and "max_latency_ms=20" in warning
    assert len([r for r in caplog.records if r.name == "batcher.cork"]) == 1
    assert make(clock).snapshot().warning is None


def test_snapshot_reports_the_fit_the_queue_and_what_is_in_flight() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=4)
    assert p.snapshot().a_s is None
    calibrate(p, clock)
    for i in range(6):
        p.add(item(f"r{i}", clock.now - 0.010))
    release(p.decide(2))
    snap = p.snapshot()
    assert snap.a_s == pytest.approx(A) and snap.b_s == pytest.approx(B)
    assert (snap.in_flight, snap.queue_rows, snap.queue_entries) == (1, 2, 2)
    assert snap.avg_wait_ms > 0
    p.forget(next(iter(p._in_flight)))
    assert p.snapshot().in_flight == 0


def test_waits_are_events_or_computed_deadlines() -> None:
    clock = FakeClock()
    p = make(clock)
    assert p.decide(3) == Wait(None)
    p.add(item("a", clock.now))
    p.add(item("a", clock.now))  # a redelivered duplicate is ignored
    assert p.queue_rows == 1
    assert p.decide(0) == Wait(None)  # nothing can change before an event


def test_within_a_priority_the_earliest_deadline_goes_first() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=1, max_latency_ms=500.0)
    calibrate(p, clock)
    loose = Pending("loose", "loose", 1, "normal", clock.now, None, clock.now + 10.0)
    tight = Pending("tight", "tight", 1, "normal", clock.now + 0.001, None, clock.now + 0.1)
    plain = item("plain", clock.now)  # due at arrival + max_latency_ms (0.5 s)
    for x in (loose, plain, tight):
        p.add(x)
    order = []
    for _ in range(3):
        d = release(p.decide(1))
        order += [e.entry_id for e in d.entries]
        p.on_complete(d.batch_id, d.rows, A * d.rows + B)
    assert order == ["tight", "plain", "loose"]


def test_fifo_cork_ignores_deadlines() -> None:
    clock = FakeClock()
    p = CorkPolicy(PolicyConfig(max_batch_size=1, max_latency_ms=500.0), clock, edf=False)
    calibrate(p, clock)
    p.add(Pending("loose", "loose", 1, "normal", clock.now, None, clock.now + 10.0))
    p.add(Pending("tight", "tight", 1, "normal", clock.now + 0.001, None, clock.now + 0.1))
    assert [e.entry_id for e in release(p.decide(1)).entries] == ["loose"]


def test_a_batch_is_cut_so_that_its_earliest_deadline_is_met() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=32, max_latency_ms=10_000.0)
    calibrate(p, clock)
    # 32 rows would take 2 ms * 32 + 20 ms = 84 ms; the urgent one has 50 ms.
    p.add(Pending("urgent", "urgent", 1, "normal", clock.now, None, clock.now + 0.050))
    for i in range(31):
        p.add(item(f"r{i}", clock.now))
    d = release(p.decide(1))
    assert d.entries[0].entry_id == "urgent"
    assert A * d.rows + B <= 0.050 and d.rows >= 10


def test_a_job_whose_deadline_passes_before_it_starts_is_shed_as_deadline_exceeded() -> None:
    clock = FakeClock()
    p = make(clock, max_batch_size=32, max_latency_ms=200.0)
    calibrate(p, clock)
    p.add(Pending("late", "late", 1, "normal", clock.now, clock.now + 5.0, clock.now + 0.05))
    p.add(Pending("ttl", "ttl", 1, "normal", clock.now, clock.now + 0.05, None))
    assert isinstance(p.decide(0), Wait)  # no lane: they wait
    clock.now += 0.06
    first = p.decide(0)
    assert isinstance(first, Shed) and first.reason == "deadline_exceeded"
    assert [e.entry_id for e in first.entries] == ["late"]
    second = p.decide(0)
    assert isinstance(second, Shed) and second.reason == "expired"
    assert [e.entry_id for e in second.entries] == ["ttl"]


def test_shed_mode_plans_with_the_overheads_tail_not_their_median() -> None:
    """Shed mode promises served jobs' p99: a job that makes its budget only when its batch's
    overhead (hand-off, fetch, final write) is typical, and misses it one batch in ten, is shed;
    the wait rules (CORK) keep using the median."""
    clock = FakeClock()
    p = make(clock, max_batch_size=32, max_latency_ms=200.0, on_overload="shed")
    calibrate(p, clock)
    for i in range(31):  # 4 of 31 batches see 20 ms of overhead, the rest 1 ms
        clock.now += 1.0
        p.add(item(f"o{i}", clock.now))
        d = p.decide(1)
        while isinstance(d, Wait):
            assert d.until_s is not None
            clock.now = d.until_s
            d = p.decide(1)
        d = release(d)
        p.on_complete(d.batch_id, d.rows, A * d.rows + B, 0.020 if i % 10 == 0 else 0.001)
    assert p.snapshot().extra["overhead_s"] == pytest.approx(0.001)
    clock.now += 10.0
    t = clock.now
    for i in range(32):
        p.add(item(f"f{i}", t))
    assert release(p.decide(1)).rows == 32  # ends at t + 84 ms
    # Queued behind it: ends at t + 84 + 22 ms + overhead; its budget ends at t + 121 ms, which
    # the median overhead (1 ms) makes and the tail (20 ms) does not.
    p.add(item("x", t + 0.121 - 0.200))
    clock.now = t + 0.010
    d = p.decide(0)
    assert isinstance(d, Shed) and d.reason == "overloaded", d
    assert [e.entry_id for e in d.entries] == ["x"]
