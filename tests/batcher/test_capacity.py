"""The batcher's capacity: lanes, the staged batch per lane, worker choice, dead workers."""

from __future__ import annotations

import pytest

from batcher.capacity import Capacity, WorkerInfo


def _cap(lead_s: float = 0.003, **lanes: int) -> Capacity:
    cap = Capacity(lead_s)
    cap.sync([WorkerInfo(w, n, True) for w, n in lanes.items()], 0.0)
    return cap


def test_a_lane_is_offered_again_one_lead_before_its_predict_ends() -> None:
    cap = _cap(w1=1)
    assert cap.free_lanes(0.0) == 1
    cap.dispatched("w1", "b1", 0.0, predict_s=0.010)  # predict from 0.003 to 0.013
    assert cap.free_lanes(0.005) == 0
    assert cap.next_change_s(0.005) == pytest.approx(0.010)  # 0.013 - lead
    assert cap.free_lanes(0.0101) == 1
    cap.dispatched("w1", "b2", 0.010, predict_s=0.010)  # staged: starts at 0.013
    assert cap.free_lanes(0.012) == 0
    # Even once b2 is expected to be nearly done, no third batch: one staged per lane at most.
    assert cap.free_lanes(0.030) == 0 and cap.next_change_s(0.030) is None
    assert cap.reported("w1", "b1") is not None
    assert cap.free_lanes(0.030) == 1


def test_without_a_measured_lead_a_lane_frees_only_on_its_report() -> None:
    cap = _cap(lead_s=0.0, w1=1)
    cap.dispatched("w1", "b1", 0.0, predict_s=0.010)
    assert cap.free_lanes(1.0) == 0 and cap.next_change_s(1.0) is None
    cap.reported("w1", "b1")
    assert cap.free_lanes(1.0) == 1


def test_predict_concurrency_gives_that_many_lanes_per_worker() -> None:
    cap = _cap(w1=2, w2=1)
    assert cap.lanes == 3 and cap.free_lanes(0.0) == 3
    for i in range(3):
        worker = cap.pick(0.0)
        assert worker is not None
        cap.dispatched(worker, f"b{i}", 0.0, predict_s=1.0)
    assert cap.free_lanes(0.5) == 0 and cap.pick(0.5) is None


def test_the_worker_with_the_most_idle_lanes_gets_the_next_batch() -> None:
    cap = _cap(w1=1, w2=1)
    first = cap.pick(0.0)
    assert first is not None
    cap.dispatched(first, "b1", 0.0, predict_s=1.0)
    second = cap.pick(0.0)
    assert second is not None and second != first


def test_starting_and_draining_workers_take_no_batch_but_keep_theirs() -> None:
    cap = Capacity(0.003)
    cap.sync([WorkerInfo("w1", 1, True)], 0.0)
    cap.dispatched("w1", "b1", 0.0, predict_s=0.01)
    cap.sync([WorkerInfo("w1", 1, False)], 0.0)  # draining
    assert cap.free_lanes(1.0) == 0 and cap.pick(1.0) is None
    assert cap.reported("w1", "b1") is not None


def test_a_vanished_worker_is_gone_with_its_batches() -> None:
    cap = _cap(w1=1, w2=1)
    cap.dispatched("w1", "b1", 0.0, predict_s=1.0)
    gone = cap.sync([WorkerInfo("w2", 1, True)], 0.5)
    assert list(gone) == ["w1"] and [o.batch_id for o in gone["w1"]] == ["b1"]
    assert cap.holder("b1") is None and cap.lanes == 1


def test_a_new_leader_counts_the_batches_a_worker_says_it_holds() -> None:
    cap = Capacity(0.003)
    cap.sync([WorkerInfo("w1", 1, True, batches=("old-1",))], 0.0)
    assert cap.free_lanes(100.0) == 0  # busy until reported, however long
    cap.reported("w1", "old-1")
    assert cap.free_lanes(100.0) == 1
