"""What happens to a dead worker's entries: a pure decision core, driven step by step."""

from __future__ import annotations

from batcher.recovery import Recovery, fate_of


def _run(rec: Recovery, batch_id: str) -> tuple[str, ...]:
    group = rec.next_group()
    assert group is not None
    rec.dispatched(group, batch_id)
    return group.keys


def test_fates_by_status() -> None:
    assert fate_of("queued") == "requeue"  # never started: no one is charged
    assert fate_of("running") == "suspect"
    assert [fate_of(s) for s in ("succeeded", "failed", "canceled", "expired", None)] == [
        "drop"] * 5


def test_a_group_first_runs_again_whole_and_alone() -> None:
    rec = Recovery(lambda rows: 0.01)
    rec.add(["a", "b", "c"])
    rec.add(["d"])
    assert _run(rec, "x1") == ("a", "b", "c")
    assert rec.next_group() is None  # one suspect group at a time
    assert rec.done("x1")
    assert _run(rec, "x2") == ("d",)


def test_a_group_that_dies_again_is_split_one_by_one_when_that_is_quicker() -> None:
    rec = Recovery(lambda rows: 0.01, restart_s=5.0)  # runs are cheap, deaths are not
    rec.add(list("abcdefgh"))
    _run(rec, "x1")
    rec.died("x1")
    singles = []
    for i in range(8):
        keys = _run(rec, f"s{i}")
        singles.append(keys)
        rec.done(f"s{i}")
    assert singles == [(k,) for k in "abcdefgh"]
    assert len(rec) == 0


def test_bisection_when_runs_are_dear_and_deaths_cheap() -> None:
    rec = Recovery(lambda rows: 10.0 + rows, restart_s=0.5)
    assert not rec.one_by_one(16)
    rec.add([f"k{i}" for i in range(16)])
    _run(rec, "x1")
    rec.died("x1")
    first = _run(rec, "x2")
    assert len(first) == 8


def test_a_timed_out_batch_is_split_at_once_and_a_lone_death_runs_alone_again() -> None:
    rec = Recovery(lambda rows: 0.01)
    rec.add(["a", "b"], how="timeout")
    assert _run(rec, "x1") == ("a",)
    rec.died("x1")
    group = rec.next_group()
    assert group is not None and group.keys == ("a",) and group.solo and group.generation == 2


def test_finished_entries_are_forgotten_and_a_failed_dispatch_waits_again() -> None:
    rec = Recovery(lambda rows: 0.01)
    rec.add(["a", "b", "c"])
    rec.discard(["b"])
    group = rec.next_group()
    assert group is not None and group.keys == ("a", "c")
    rec.dispatched(group, "x1")
    rec.undispatched("x1")
    assert rec.next_group() == group
