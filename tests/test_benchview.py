"""`asyncinfer bench`'s display: a bar rewritten in place on a terminal, a line now and then in a
log, and the closing table."""

from __future__ import annotations

import io

from asyncinfer.benchview import BenchProgress, ProgressView, progress_line, summary_table


def _p(elapsed: float) -> BenchProgress:
    return BenchProgress(elapsed_s=elapsed, duration_s=10, sent=50, done=45, ok=40, rejected=3,
                         failed=2, throughput_per_s=48.5, p50_ms=12.25, p99_ms=3.5)


def test_bar_shows_progress_throughput_and_latency() -> None:
    line = progress_line(_p(5.0))
    assert line.startswith("[" + "#" * 12 + "." * 12 + "]")
    for part in ("5.0/10s", "ok 40", "rejected 3", "failed 2", "in flight 5", "48.5 jobs/s",
                 "p50 12ms", "p99 3.5ms"):
        assert part in line


def test_terminal_rewrites_in_place_a_log_gets_lines() -> None:
    tty = io.StringIO()
    view = ProgressView(tty, tty=True)
    view(_p(1.0))
    view(_p(1.5))
    view.close()
    assert tty.getvalue().count("\r") == 2 and tty.getvalue().endswith("\n")
    log = io.StringIO()
    view = ProgressView(log, tty=False)
    for t in (0.0, 0.5, 1.0, 2.0, 2.5, 4.1):
        view(_p(t))
    view(_p(4.5), final=True)  # the last one always shows
    assert log.getvalue().count("\n") == 4 and "\r" not in log.getvalue()


def test_summary_table() -> None:
    table = summary_table({
        "config": {"mode": "open", "rate": 50.0, "arrivals": "poisson", "label": "bench m"},
        "window_s": 10.0, "arrived": 500, "offered_per_s": 50.0,
        "status_counts": {"succeeded": 498, "http_429": 2}, "throughput_per_s": 49.8,
        "latency_ms": {"p50": 9.5, "p90": 20, "p99": 41, "max": 80},
        "batch_size": {"mean": 3.25}, "slo_ms": 100, "goodput_per_s": 49.0})
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["run", "bench", "m", "50"]
    assert ["succeeded", "498"] in [ln.split() for ln in lines]
    assert ["http_429", "2"] in [ln.split() for ln in lines]
    assert any(ln.startswith("latency p99") and ln.endswith("41ms") for ln in lines)
    assert any(ln.startswith("goodput") and "within 100 ms" in ln for ln in lines)
    closed = summary_table({"config": {"mode": "closed", "concurrency": 8}, "window_s": 5.0})
    assert "8 clients" in closed and "latency p50  -" in closed
