"""What `asyncinfer bench` shows, apart from how the load is made: a progress bar with live
throughput and latency while it runs, then a table and, on request, a plot.

The load generator reports through `BenchProgress` snapshots and hands over `Sample`s at the
end; this module only draws them (so any generator that fills these two can be shown).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

BAR_WIDTH = 24
LOG_EVERY_S = 2.0  # not a terminal: one line this often


@dataclass(frozen=True)
class BenchProgress:
    """One moment of a run."""

    elapsed_s: float
    duration_s: float
    sent: int
    done: int
    ok: int
    rejected: int
    failed: int
    throughput_per_s: float  # jobs finished ok per second, over the last few seconds
    p50_ms: float | None  # latency of the jobs finished over the last few seconds
    p99_ms: float | None
    label: str = ""

    @property
    def in_flight(self) -> int:
        return self.sent - self.done


@dataclass(frozen=True)
class Sample:
    """One job: when it was due (seconds from the start), its latency and how it ended."""

    sent_s: float
    latency_ms: float | None
    outcome: str


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms" if v >= 10 else f"{v:.1f}ms"


def progress_line(p: BenchProgress) -> str:
    frac = min(1.0, p.elapsed_s / p.duration_s) if p.duration_s > 0 else 1.0
    filled = int(frac * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    label = f"[{p.label}] " if p.label else ""
    return (f"{label}[{bar}] {p.elapsed_s:5.1f}/{p.duration_s:g}s  sent {p.sent}  ok {p.ok}  "
            f"rejected {p.rejected}  failed {p.failed}  in flight {p.in_flight}  "
            f"{p.throughput_per_s:6.1f} jobs/s  p50 {_ms(p.p50_ms)}  p99 {_ms(p.p99_ms)}")


class ProgressView:
    """Draws progress on `out`: rewritten in place on a terminal, else a line now and then
    (and always the final one)."""

    def __init__(self, out: TextIO = sys.stderr, tty: bool | None = None) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self._next_log_s = 0.0
        self._drawn = False

    def __call__(self, p: BenchProgress, final: bool = False) -> None:
        if self.tty:
            self.out.write(f"\r{progress_line(p)}\033[K")
            self._drawn = True
        elif final or p.elapsed_s >= self._next_log_s:
            self.out.write(progress_line(p) + "\n")
            self._next_log_s = p.elapsed_s + LOG_EVERY_S
        self.out.flush()

    def close(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run table of a load generator summary (`asyncinfer.loadgen.stats`)."""
    cfg = summary.get("config") or {}
    load = (f"{cfg.get('rate'):g} jobs/s ({cfg.get('arrivals')})" if cfg.get("mode") == "open"
            else f"{cfg.get('concurrency')} clients")
    lat = summary.get("latency_ms") or {}
    batch = (summary.get("batch_size") or {}).get("mean")
    rows: list[tuple[str, str]] = [
        ("run", f"{cfg.get('label') or ''} {load}, {summary.get('window_s', 0):.1f} s measured"
         .strip()),
        ("arrived", f"{summary.get('arrived')} ({summary.get('offered_per_s', 0):.1f} jobs/s)"),
        *((f"  {name}", str(n)) for name, n in sorted((summary.get("status_counts") or {})
                                                      .items())),
        ("throughput", f"{summary.get('throughput_per_s', 0):.1f} jobs/s succeeded"),
        *((f"latency {q}", _ms(lat.get(q))) for q in ("p50", "p90", "p99", "max")),
    ]
    if batch is not None:
        rows.append(("batch size", f"{batch:.1f} rows on average"))
    if "goodput_per_s" in summary:
        rows.append(("goodput", f"{summary['goodput_per_s']:.1f} jobs/s within "
                                f"{summary.get('slo_ms'):g} ms"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def plot(samples: Sequence[Sample], path: Path, title: str) -> Path:
    """Latency of each job over the run and throughput per second, as a PNG (needs
    matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ok = [(s.sent_s, s.latency_ms) for s in samples if s.latency_ms is not None]
    if ok:
        top.scatter([t for t, _ in ok], [v for _, v in ok], s=4, alpha=0.5)
    top.set_ylabel("latency (ms)")
    top.set_yscale("log")
    top.set_title(title)
    seconds: dict[int, int] = {}
    for s in samples:
        if s.latency_ms is not None:
            finished = int(s.sent_s + s.latency_ms / 1000)
            seconds[finished] = seconds.get(finished, 0) + 1
    xs = sorted(seconds)
    bottom.bar(xs, [seconds[x] for x in xs], width=0.9, align="edge")
    bottom.set_ylabel("succeeded / s")
    bottom.set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
