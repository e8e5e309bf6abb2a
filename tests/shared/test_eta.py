"""The ETA and admission arithmetic (pure)."""

from __future__ import annotations

import pytest

from shared.eta import Drain, estimate, max_ahead, retry_after_s

DRAIN = Drain(a_s=0.002, b_s=0.010, overhead_s=0.003, lanes=2, free_lanes=1,
              lane_free_in_s=0.020, max_batch_size=32)


def test_a_job_with_a_free_lane_and_nothing_ahead_finishes_in_one_batch_time() -> None:
    eta = estimate(DRAIN, 0)
    assert eta.start_in_s == 0.0
    assert eta.finish_in_s == pytest.approx(0.003 + 0.002 + 0.010)


def test_rows_ahead_drain_in_full_batches_on_every_lane() -> None:
    full = 0.002 * 32 + 0.010
    assert estimate(DRAIN, 31).start_in_s == 0.0  # rides in the first batch (a free lane)
    assert estimate(DRAIN, 32).start_in_s == pytest.approx(0.020)  # the busy lane frees
    assert estimate(DRAIN, 64).start_in_s == pytest.approx(0.020)  # the other lane
    assert estimate(DRAIN, 96).start_in_s == pytest.approx(0.020 + full)
    assert estimate(DRAIN, 96).finish_in_s == pytest.approx(0.020 + full + 0.003 + full)


def test_max_ahead_is_the_last_position_that_makes_the_deadline() -> None:
    for deadline in (0.016, 0.1, 0.5, 2.0):
        n = max_ahead(DRAIN, deadline)
        assert estimate(DRAIN, n).finish_in_s <= deadline < estimate(DRAIN, n + 1).finish_in_s
    assert max_ahead(DRAIN, 0.001) == -1  # not even alone


def test_drain_needs_a_fit_and_a_lane() -> None:
    assert Drain.from_state({}, 32) is None
    assert Drain.from_state({"a_s": 0.002, "b_s": 0.01, "lanes": 0}, 32) is None
    drain = Drain.from_state({"a_s": 0.002, "b_s": 0.01, "lanes": 1, "free_lanes": 0,
                              "lane_free_in_ms": 5.0, "overhead_s": 0.001}, 32)
    assert drain is not None and drain.lane_free_in_s == 0.005


def test_retry_after_is_what_the_deadline_misses_by_at_least_a_second() -> None:
    assert retry_after_s(estimate(DRAIN, 1000), 0.05) >= 1
