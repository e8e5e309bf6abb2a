"""The scaling policy with an injected clock: no processes, no sleeps."""

from __future__ import annotations

import itertools

from workers.scaling import ScaleConfig, ScaleInputs, ScalingPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _policy(**kw: float) -> tuple[ScalingPolicy, Clock]:
    clock = Clock()
    config = ScaleConfig(concurrency_target=int(kw.pop("target", 10)),
                         min_workers=int(kw.pop("min_workers", 0)),
                         max_workers=int(kw.pop("max_workers", 4)),
                         scale_down_delay_s=kw.pop("delay", 30.0))
    return ScalingPolicy(config, clock), clock


def _inputs(queued: int, live: int = 0, starting: int = 0, free: int = 4,
            in_flight: int = 0) -> ScaleInputs:
    return ScaleInputs(queued=queued, in_flight=in_flight, live=live, starting=starting,
                       free_devices=free)


def test_steps_up_at_once_to_the_target() -> None:
    policy, _ = _policy()
    d = policy.decide(_inputs(queued=25, in_flight=5, live=1, free=3))
    assert (d.action, d.desired, d.delta) == ("up", 3, 2)


def test_starting_workers_count_as_capacity() -> None:
    policy, _ = _policy()
    d = policy.decide(_inputs(queued=30, live=1, starting=2, free=1))
    assert d.action == "hold" and d.desired == 3


def test_device_limit_and_max_workers_clamp() -> None:
    policy, _ = _policy(max_workers=8)
    d = policy.decide(_inputs(queued=1000, live=2, free=1))
    assert d.desired == 3 and d.delta == 1
    policy, _ = _policy(max_workers=2)
    assert policy.decide(_inputs(queued=1000, live=0, free=4)).desired == 2


def test_scale_down_waits_for_the_delay_and_goes_one_at_a_time() -> None:
    policy, clock = _policy(delay=30)
    assert policy.decide(_inputs(queued=0, live=3)).action == "hold"
    clock.now = 29.9
    assert policy.decide(_inputs(queued=0, live=3)).action == "hold"
    clock.now = 30.0
    d = policy.decide(_inputs(queued=0, live=3))
    assert (d.action, d.desired) == ("down", 2)
    clock.now = 45
    assert policy.decide(_inputs(queued=0, live=2)).action == "hold"
    clock.now = 60
    assert policy.decide(_inputs(queued=0, live=2)).desired == 1


def test_square_wave_never_scales_down_more_than_once_per_window() -> None:
    policy, clock = _policy(delay=20, target=10)
    live, downs = 4, []
    for step in range(0, 600):
        clock.now = step * 0.5
        high = (step // 10) % 2 == 0  # 5 s on, 5 s off
        d = policy.decide(_inputs(queued=40 if high else 0, live=live, free=4 - live))
        if d.action == "down":
            downs.append(clock.now)
        live += d.delta
    assert all(b - a >= 20 for a, b in itertools.pairwise(downs))
    assert live == 4  # the load comes back before it has stayed low for the delay


def test_scale_to_zero_and_wake_on_the_first_job() -> None:
    policy, clock = _policy(delay=5)
    clock.now = 0
    policy.decide(_inputs(queued=0, live=1, free=3))
    clock.now = 5
    assert policy.decide(_inputs(queued=0, live=1, free=3)).desired == 0
    clock.now = 6
    d = policy.decide(_inputs(queued=1, live=0, free=4))
    assert (d.action, d.desired) == ("up", 1)


def test_min_workers_kept_without_load() -> None:
    policy, clock = _policy(min_workers=1, delay=1)
    clock.now = 100
    d = policy.decide(_inputs(queued=0, live=0, free=4))
    assert (d.action, d.desired) == ("up", 1)


def test_no_scale_down_while_workers_start() -> None:
    policy, _clock = _policy(delay=0)
    d = policy.decide(_inputs(queued=0, live=2, starting=1, free=1))
    assert d.action == "hold"
