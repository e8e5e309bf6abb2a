"""What the CORK policy learns about time: how long a batch takes, and how fast requests arrive.

`LatencyModel` fits `duration = a·rows + b` by least squares over the most recent completed
batches' predict spans. `Overhead` tracks the rest of a batch's latency. `ArrivalRate` keeps a
smoothed inter-arrival gap. Both are pure: time only comes in as
arguments or through the injected clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from batcher.policy import Clock

# Below this spread of batch sizes (sum of squared deviations, in rows²) the window cannot pin
# down a slope: e.g. 49 batches of 32 rows and one of 31 give 0.98.
MIN_ROW_SPREAD = 1.0


@dataclass(frozen=True)
class Fit:
    """One fitted line; `identifiable` is False when it came from a degenerate window."""

    a_s: float
    b_s: float
    identifiable: bool


class LatencyModel:
    """Least-squares fit of batch duration against batch ROWS (not requests).

    - The first `warmup` completions ever seen are discarded (compilation, cold caches).
    - Only the latest `window` samples count.
    - Refits are lazy (on `observe`) and at most every `refit_interval_s` on the clock, with two
      start-up exceptions: each of the first `eager_samples` kept samples refits at once (a line
      through three probes is rough, and a rough line frozen for seconds sheds wrongly), and so
      does the first sample that makes the window identifiable. Both happen a bounded number of
      times over the model's life; `eager_samples=0` leaves only the second.
    - Constrained fit: if the free slope is <= 0 it is fixed at `min_a_s` and `b` refit; if the
      free intercept is < 0, `b` is 0 and the slope is refit through the origin.
    - Degenerate window (all batches about the same size): a line cannot be fitted. If an
      identifiable fit existed, its shape (the a:b ratio) is kept and rescaled so it predicts
      the window's mean duration at the window's mean size; otherwise the whole cost is charged
      per row (`a = mean duration / mean rows`, `b = 0`). The second choice never makes waiting
      for more rows look profitable, which is the safe error before anything is known.
    - `overrun`: at each refit, the `overrun_quantile` (default: the largest) of duration over
      prediction across the window; `predict_high` scales by it, for decisions that must hold
      for slow batches too (deadlines, shedding).
    """

    def __init__(
        self,
        clock: Clock,
        *,
        initial_a_s: float,
        initial_b_s: float,
        window: int = 50,
        warmup: int = 2,
        refit_interval_s: float = 2.0,
        min_a_s: float = 1e-6,
        overrun_quantile: float = 1.0,
        eager_samples: int = 10,
    ) -> None:
        self._clock = clock
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._warmup = warmup
        self._interval_s = refit_interval_s
        self._min_a_s = min_a_s
        self._seen = 0
        self._last_refit_s: float | None = None
        self._fit = Fit(max(min_a_s, initial_a_s), max(0.0, initial_b_s), identifiable=False)
        self._ever_identifiable = False
        self._shape: Fit | None = None
        self._overrun_q = overrun_quantile
        self._eager = eager_samples
        self._kept = 0
        self._overrun = 1.0

    @property
    def a_s(self) -> float:
        return self._fit.a_s

    @property
    def b_s(self) -> float:
        return self._fit.b_s

    @property
    def identifiable(self) -> bool:
        """Whether the current a, b come from a window with enough spread of batch sizes."""
        return self._fit.identifiable

    @property
    def fitted(self) -> bool:
        """Whether a, b come from data at all (False: still the initial guess)."""
        return self._last_refit_s is not None

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def seen(self) -> int:
        return self._seen

    @property
    def overrun(self) -> float:
        """How much slower than predicted a slow batch runs: the `overrun_quantile` of
        duration / prediction over the window at the last refit, at least 1."""
        return self._overrun

    def predict(self, rows: int) -> float:
        """Expected duration in seconds of a batch of `rows` rows."""
        return self._fit.a_s * max(0, rows) + self._fit.b_s

    def predict_high(self, rows: int) -> float:
        """A duration that few batches of `rows` rows exceed (`predict` times `overrun`)."""
        return self.predict(rows) * self._overrun

    def rows_within_high(self, seconds: float) -> int:
        """The most rows whose `predict_high` fits in `seconds` (its inverse)."""
        per_row, fixed = self.a_s * self._overrun, self.b_s * self._overrun
        if seconds <= fixed or per_row <= 0:
            return 0
        return int((seconds - fixed) / per_row)

    def observe(self, rows: int, duration_s: float) -> None:
        """Record one completed batch; refit if due."""
        if rows <= 0 or not math.isfinite(duration_s) or duration_s < 0:
            return
        self._seen += 1
        if self._seen <= self._warmup:
            return
        self._samples.append((rows, duration_s))
        self._kept += 1
        now = self._clock()
        due = self._last_refit_s is None or now - self._last_refit_s >= self._interval_s
        first_line = not self._ever_identifiable and _spread(self._samples) >= MIN_ROW_SPREAD
        if due or self._kept <= self._eager or first_line:
            self.refit()

    def refit(self) -> None:
        """Refit now from the current window, regardless of the rate limit."""
        if not self._samples:
            return
        self._last_refit_s = self._clock()
        if _spread(self._samples) >= MIN_ROW_SPREAD:
            self._fit = self._least_squares()
            self._ever_identifiable = True
            self._shape = self._fit
        else:
            self._fit = self._degenerate()
        ratios = sorted(d / self.predict(n) for n, d in self._samples)
        index = min(len(ratios) - 1, math.ceil(self._overrun_q * len(ratios)) - 1)
        self._overrun = max(1.0, ratios[max(0, index)])

    def _least_squares(self) -> Fit:
        count = len(self._samples)
        mean_n = sum(n for n, _ in self._samples) / count
        mean_d = sum(d for _, d in self._samples) / count
        sxx = sum((n - mean_n) ** 2 for n, _ in self._samples)
        sxy = sum((n - mean_n) * (d - mean_d) for n, d in self._samples)
        a = sxy / sxx
        b = mean_d - a * mean_n
        if a <= self._min_a_s:
            a = self._min_a_s
            b = max(0.0, mean_d - a * mean_n)
        elif b < 0:
            b = 0.0
            snn = sum(n * n for n, _ in self._samples)
            a = max(self._min_a_s, sum(n * d for n, d in self._samples) / snn)
        return Fit(a, b, identifiable=True)

    def _degenerate(self) -> Fit:
        count = len(self._samples)
        mean_n = sum(n for n, _ in self._samples) / count
        mean_d = sum(d for _, d in self._samples) / count
        shape = self._shape
        if shape is not None:
            scale = mean_d / (shape.a_s * mean_n + shape.b_s)
            return Fit(max(self._min_a_s, shape.a_s * scale), shape.b_s * scale, False)
        return Fit(max(self._min_a_s, mean_d / mean_n), 0.0, identifiable=False)


def _spread(samples: deque[tuple[int, float]]) -> float:
    if len(samples) < 2:
        return 0.0
    mean_n = sum(n for n, _ in samples) / len(samples)
    return sum((n - mean_n) ** 2 for n, _ in samples)


class ArrivalRate:
    """Exponentially weighted mean of the gaps between arrivals, and of rows per arrival.

    The gap in progress counts as a censored sample: once it is longer than the mean, the mean
    grows as if the next arrival came now, so a rate that has dropped is noticed without waiting
    for the next arrival (yet one slow gap of a busy Poisson stream moves it only a little).
    """

    def __init__(self, smoothing: float = 0.125) -> None:
        self._alpha = smoothing
        self._last_s: float | None = None
        self._gap_s: float | None = None
        self._rows = 1.0

    @property
    def last_arrival_s(self) -> float | None:
        return self._last_s

    @property
    def rows_per_arrival(self) -> float:
        return self._rows

    def observe(self, now: float, rows: int) -> None:
        """One request of `rows` rows arrived at `now`."""
        self._rows += self._alpha * (max(1, rows) - self._rows)
        if self._last_s is not None:
            gap = max(0.0, now - self._last_s)
            mean = self._gap_s
            self._gap_s = gap if mean is None else mean + self._alpha * (gap - mean)
        self._last_s = now if self._last_s is None else max(self._last_s, now)

    def mean_gap_s(self, now: float) -> float:
        """Expected time between arrivals as of `now`; infinite before two arrivals."""
        if self._gap_s is None or self._last_s is None:
            return math.inf
        overdue = max(0.0, now - self._last_s - self._gap_s)
        return self._gap_s + self._alpha * overdue

    def rate_hz(self, now: float) -> float:
        """Requests per second as of `now`."""
        gap = self.mean_gap_s(now)
        return 0.0 if math.isinf(gap) else (math.inf if gap == 0 else 1.0 / gap)


class Overhead:
    """The fixed part of a batch's latency that is not its predict (hand-off, fetch,
    preprocess, postprocess, final write): a robust running estimate, the median of the last
    `window` samples, so one slow hand-off does not move it."""

    def __init__(self, window: int = 31) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self._value_s = 0.0
        self._high_s = 0.0

    @property
    def value_s(self) -> float:
        return self._value_s

    @property
    def high_s(self) -> float:
        """The highest of the window: what a promise about a tail (shed mode's p99) plans with.
        Every job of a batch shares its overhead, so a batch over the plan one time in ten makes
        a tenth of the jobs late, ten times what a p99 allows."""
        return self._high_s

    @property
    def samples(self) -> int:
        return len(self._samples)

    def observe(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        self._samples.append(seconds)
        ordered = sorted(self._samples)
        self._value_s = ordered[len(ordered) // 2]
        self._high_s = ordered[-1]
