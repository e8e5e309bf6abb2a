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
    gone = cap.sync([WorkerInfo("w2", 1, True)], 0.5).gone
    assert list(gone) == ["w1"] and [o.batch_id for o in gone["w1"]] == ["b1"]
    assert cap.holder("b1") is None and cap.lanes == 1


def test_a_new_leader_counts_the_batches_a_worker_says_it_holds() -> None:
    cap = Capacity(0.003)
    cap.sync([WorkerInfo("w1", 1, True, batches=("old-1",))], 0.0)
    assert cap.free_lanes(100.0) == 0  # busy until reported, however long
    cap.reported("w1", "old-1")
    assert cap.free_lanes(100.0) == 1


def test_right_after_a_redis_restart_nobody_is_declared_gone() -> None:
    cap = _cap(w1=1)
    cap.dispatched("w1", "b1", 0.0, predict_s=1.0)
    assert cap.sync([], 0.5, keep_missing=True).gone == {}
    assert cap.holder("b1") == "w1"


def test_a_batch_its_heartbeats_stop_listing_is_over_even_if_its_report_was_lost() -> None:
    cap = Capacity(0.003)
    cap.sync([WorkerInfo("w1", 1, True, beat=1)], 0.0)
    cap.dispatched("w1", "b1", 0.0, predict_s=0.01)
    cap.sync([WorkerInfo("w1", 1, True, batches=("b1",), beat=2)], 0.5)
    for beat in (3, 4):
        assert cap.sync([WorkerInfo("w1", 1, True, beat=beat)], 1.0).lost == []
    assert cap.sync([WorkerInfo("w1", 1, True, beat=4)], 1.5).lost == []  # not a new beat
    lost = cap.sync([WorkerInfo("w1", 1, True, beat=5)], 2.0).lost
    assert [(w, o.batch_id) for w, o in lost] == [("w1", "b1")]
    assert cap.free_lanes(2.0) == 1


def test_a_worker_running_suspects_gets_nothing_else_until_they_report() -> None:
    cap = _cap(w1=2, w2=1)
    worker = cap.pick(0.0, alone=True)
    assert worker is not None
    cap.dispatched(worker, "s1", 0.0, predict_s=0.01)
    cap.isolate(worker, "s1")
    assert cap.free_lanes(5.0) == (1 if worker == "w1" else 2)
    assert cap.pick(5.0) != worker
    cap.reported(worker, "s1")
    assert cap.free_lanes(5.0) == 3


def test_suspects_go_only_to_a_worker_holding_nothing() -> None:
    cap = _cap(w1=1)
    cap.dispatched("w1", "b1", 0.0, predict_s=0.01)
    assert cap.pick(1.0) == "w1" and cap.pick(1.0, alone=True) is None


def test_a_batch_sent_to_a_worker_that_just_died_is_ignored() -> None:
    cap = _cap(w1=1)
    cap.dispatched("nobody", "b1", 0.0, predict_s=0.01)
    assert cap.holder("b1") is None


def test_a_staged_batch_starts_when_the_one_before_reports_not_when_predicted() -> None:
    cap = _cap(w1=1)
    cap.dispatched("w1", "b1", 0.0, predict_s=0.010)  # expected: 0.003 to 0.013
    cap.dispatched("w1", "b2", 0.0101, predict_s=0.010)  # staged: 0.013 to 0.023
    cap.reported("w1", "b1", now=0.030)  # b1 ran long: b2 starts only now
    assert cap.free_lanes(0.030) == 0
    assert cap.next_change_s(0.030) == pytest.approx(0.030 + 0.010 - 0.003)
