"""LatencyModel and ArrivalRate: the fit of a*rows + b, its guards, and the arrival estimate."""

from __future__ import annotations

import math
import random

import pytest

from batcher.latency import ArrivalRate, LatencyModel, Overhead
from tests.clock import FakeClock


def model(clock: FakeClock, **kwargs: float) -> LatencyModel:
    return LatencyModel(clock, initial_a_s=0.01, initial_b_s=0.01, **kwargs)  # type: ignore[arg-type]


def feed(m: LatencyModel, clock: FakeClock, samples: list[tuple[int, float]], dt: float) -> None:
    for rows, duration in samples:
        clock.now += dt
        m.observe(rows, duration)


def test_fit_recovers_a_and_b_within_5_percent_after_a_few_dozen_batches() -> None:
    clock = FakeClock()
    m = model(clock)
    rng = random.Random(3)
    a, b = 0.002, 0.020
    samples = [(n, (a * n + b) * (1 + rng.uniform(-0.03, 0.03))) for n in
               (rng.randint(1, 32) for _ in range(40))]
    feed(m, clock, samples, dt=0.5)
    m.refit()
    assert m.identifiable
    assert m.a_s == pytest.approx(a, rel=0.05)
    assert m.b_s == pytest.approx(b, rel=0.05)


def test_fit_counts_rows_and_skips_the_first_two_batches() -> None:
    clock = FakeClock()
    m = model(clock)
    # Two wild warm-up batches (compilation) must not bend the line.
    feed(m, clock, [(1, 5.0), (1, 5.0)], dt=0.1)
    assert not m.fitted
    feed(m, clock, [(n, 0.001 * n + 0.010) for n in (1, 2, 3, 8, 16)], dt=0.1)
    assert m.seen == 7 and m.samples == 5
    assert m.a_s == pytest.approx(0.001)
    assert m.b_s == pytest.approx(0.010)
    assert m.predict(10) == pytest.approx(0.020)


def test_only_the_last_50_batches_count() -> None:
    clock = FakeClock()
    m = model(clock)
    feed(m, clock, [(1, 0), (1, 0)], dt=1)
    feed(m, clock, [(n, 0.010 * n + 0.100) for n in (1, 5, 9) * 20], dt=3)  # old regime
    feed(m, clock, [(n, 0.001 * n + 0.010) for n in (1, 5, 9) * 17], dt=3)  # 51 new samples
    assert m.samples == 50
    assert m.a_s == pytest.approx(0.001)
    assert m.b_s == pytest.approx(0.010)


def test_constant_batch_size_without_a_previous_line_charges_everything_per_row() -> None:
    clock = FakeClock()
    m = model(clock)
    feed(m, clock, [(8, 0.040)] * 12, dt=0.1)
    assert m.fitted and not m.identifiable
    # The minimum-norm least-squares answer would be a = b = 0.040*8/65 ~ 4.9 ms: wrong at every
    # size but 8. The fallback is exact at 8 and never makes bigger batches look cheaper.
    assert m.b_s == 0.0
    assert m.a_s == pytest.approx(0.005)
    assert m.predict(8) == pytest.approx(0.040)


def test_constant_batch_size_after_a_line_keeps_its_shape() -> None:
    clock = FakeClock()
    m = model(clock, refit_interval_s=0.0)
    feed(m, clock, [(1, 0), (1, 0)], dt=1)
    feed(m, clock, [(n, 0.002 * n + 0.020) for n in (1, 2, 3, 16)], dt=1)
    assert m.identifiable
    # Every batch is full from now on: the window cannot fit a line, the last line stays.
    feed(m, clock, [(32, 0.002 * 32 + 0.020)] * 50, dt=1)
    assert not m.identifiable
    assert (m.a_s, m.b_s) == (pytest.approx(0.002), pytest.approx(0.020))
    # Then the model gets 10% slower: the ratio a:b stays, the level follows the data.
    feed(m, clock, [(32, 1.1 * (0.002 * 32 + 0.020))] * 50, dt=1)
    assert m.a_s / m.b_s == pytest.approx(0.002 / 0.020)
    assert m.predict(32) == pytest.approx(1.1 * 0.084)


def test_refits_are_rate_limited_after_the_start_up_samples() -> None:
    clock = FakeClock()
    m = model(clock, refit_interval_s=2.0, eager_samples=3)
    feed(m, clock, [(1, 0), (1, 0)], dt=0.01)
    feed(m, clock, [(n, 0.001 * n + 0.010) for n in (1, 2, 3)], dt=0.01)  # eager refits
    assert m.a_s == pytest.approx(0.001)
    feed(m, clock, [(n, 0.004 * n + 0.010) for n in (4, 8, 12, 16)], dt=0.01)
    assert m.a_s == pytest.approx(0.001)  # within 2 s of the last refit: unchanged
    clock.now += 2.0
    m.observe(16, 0.004 * 16 + 0.010)
    assert m.a_s > 0.002


def test_clamps_keep_a_positive_and_b_non_negative() -> None:
    clock = FakeClock()
    falling = model(clock)
    feed(falling, clock, [(1, 0), (1, 0), (1, 0.030), (10, 0.020), (20, 0.010)], dt=0.1)
    assert falling.a_s == pytest.approx(1e-6)
    assert falling.b_s == pytest.approx(0.020 - 1e-6 * 31 / 3)
    through_origin = model(clock)
    feed(through_origin, clock, [(1, 0), (1, 0), (10, 0.010), (20, 0.030)], dt=0.1)
    assert through_origin.b_s == 0.0
    assert through_origin.a_s == pytest.approx((10 * 0.010 + 20 * 0.030) / (100 + 400))


def test_overrun_is_a_high_quantile_of_duration_over_prediction() -> None:
    clock = FakeClock()
    m = model(clock, overrun_quantile=1.0)
    exact = [(n, 0.001 * n + 0.010) for n in (1, 2, 3, 4)]
    feed(m, clock, [(1, 0), (1, 0), *exact], dt=0.1)
    assert m.overrun == pytest.approx(1.0)
    assert m.predict_high(10) == pytest.approx(m.predict(10))


def test_arrival_rate_follows_the_gaps_and_notices_a_silence() -> None:
    rate = ArrivalRate()
    assert math.isinf(rate.mean_gap_s(0.0))
    for i in range(200):
        rate.observe(i * 0.010, 1)
    assert rate.mean_gap_s(1.99) == pytest.approx(0.010)
    assert rate.rate_hz(1.99) == pytest.approx(100.0)
    # One gap of twice the mean barely moves it; a long silence does.
    assert rate.mean_gap_s(1.99 + 0.020) < 0.012
    assert rate.mean_gap_s(1.99 + 1.0) > 0.1


def test_the_overheads_high_is_the_highest_of_its_window() -> None:
    """Every job of a batch shares the batch's overhead: planning a p99 promise with anything
    below the window's highest lets a tenth of the jobs be late when one batch in ten is."""
    overhead = Overhead(window=31)
    for i in range(31):
        overhead.observe(0.020 if i in (0, 15) else 0.001)  # 2 slow batches of 31, under 10%
    assert overhead.value_s == 0.001
    assert overhead.high_s == 0.020
    for _ in range(31):  # the slow ones leave the window
        overhead.observe(0.002)
    assert overhead.high_s == 0.002
