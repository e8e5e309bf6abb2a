"""The restart backoff core, on an injected clock."""

from __future__ import annotations

from shared.backoff import BackoffConfig, CrashLoop


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_start_failures_back_off_exponentially_then_give_up() -> None:
    clock = Clock()
    loop = CrashLoop(clock)  # the defaults users get
    c = BackoffConfig()
    delays = []
    for _ in range(c.give_up_after - 1):
        assert loop.may_start()
        delays.append(loop.exited(1, was_up=False))
        assert (loop.state, loop.may_start()) == ("backoff", False)
        clock.t += delays[-1]
        assert (loop.state, loop.may_start()) == ("ok", True)
    assert delays == [c.base_s * c.factor ** n for n in range(1, c.give_up_after)]
    assert loop.exited(1, was_up=False) == float("inf")
    assert loop.gave_up and loop.state == "failed" and not loop.may_start()
    clock.t += 3600
    assert not loop.may_start()  # given up stays given up
    assert loop.restarts == c.give_up_after and loop.last_exit == 1


def test_a_crash_after_serving_restarts_quickly_and_clears_the_streak() -> None:
    clock = Clock()
    loop = CrashLoop(clock, BackoffConfig(base_s=0.5, factor=2, max_s=4, give_up_after=3))
    assert loop.exited(-9, was_up=False) == 1.0
    assert loop.exited(-9, was_up=False) == 2.0
    loop.up()  # it came up this time
    assert loop.exited(-9, was_up=True) == 0.5  # a crash, not a start failure
    assert loop.exited(-9, was_up=False) == 1.0
    assert loop.exited(-9, was_up=False) == 2.0
    assert not loop.gave_up
    assert loop.exited(-9, was_up=False) == float("inf")
    assert loop.gave_up


def test_delays_are_capped() -> None:
    clock = Clock()
    loop = CrashLoop(clock, BackoffConfig(base_s=1, factor=10, max_s=5, give_up_after=9))
    assert [loop.exited(1, was_up=False) for _ in range(3)] == [5, 5, 5]
    assert loop.retry_in_s() == 5
