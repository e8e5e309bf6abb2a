"""The benchmark report: each issue-16 target's verdict and margin from a run's summary, and
docs/benchmarks.md rendered whole from a full run, a run without BentoML, and a GPU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.analysis import Target, targets, worker_predict
from bench.docs import REPO
from bench.report import write_report


def pt(throughput: float, p50: float, p99: float, *, goodput: float | None = None,
       clients: int | None = None, cpu_ms: float = 2.0, ok: float = 1.0,
       statuses: dict[str, int] | None = None) -> dict[str, Any]:
    """One run's point as bench.drive records it."""
    return {"throughput_per_s": throughput, "goodput_per_s": goodput, "offered_per_s": throughput,
            "concurrency": clients, "latency_ms": {"p50": p50, "p90": p99, "p99": p99},
            "batch_size": {"mean": 4.0}, "ok_fraction": ok, "server_cpu_ms_per_job": cpu_ms,
            "server_cpu_s": {"gateway": 1.0, "worker-1": 2.0}, "wall_s": 10.0,
            "client_cpu_fraction": 0.1, "status_counts": statuses or {"succeeded": 100},
            "breakdown_ms": {"to_record": 1.0, "queued": 2.0, "running": 12.0,
                             "to_client": 1.0}, "file": "001-x.json"}


def summary(device: str = "cpu", bento: bool = True) -> dict[str, Any]:
    sat = {"asyncinfer": [[pt(700, 90, 200, goodput=690, clients=64, cpu_ms=1.0),
                           pt(900, 300, 400, goodput=0, clients=256, cpu_ms=0.9)]],
           "asyncinfer/jobs-wait": [[pt(800, 80, 180, goodput=800, clients=64, cpu_ms=0.9)]]}
    one = {"asyncinfer/jobs": [pt(200, 4.0, 6.0)], "asyncinfer/jobs-wait": [pt(210, 5.5, 7)]}
    loads: list[dict[str, Any]] = [
        {"fraction": f, "rate": 900 * f, "asyncinfer": [pt(900 * f, 10 * f, 100)]}
        for f in (0.25, 0.5, 0.75)]
    if bento:
        sat["bentoml-w2"] = [[pt(300, 150, 240, goodput=200, clients=64, cpu_ms=2.5),
                              pt(200, 500, 900, goodput=0, clients=256, ok=0.5,
                                 statuses={"succeeded": 50, "http_503": 50})]]
        sat["bentoml-w1"] = [[pt(250, 160, 245, goodput=240, clients=64)]]
        one |= {"bentoml-w2": [pt(100, 10, 12)], "bentoml-w1": [pt(90, 11, 13)]}
        for ld in loads:
            ld["bentoml-w2"] = [pt(ld["rate"], 8, 90)]
    res: dict[str, Any] = {
        "mode": "quick", "device": device, "replicas": 2, "note": "", "notes": [],
        "profile": {"sat_concurrency": [64, 256], "light_rate": 25}, "started": "today",
        "elapsed_s": 300.0, "limit": {"batch1_forward_ms": 2.0, "batch1_predict_ms": 2.2},
        "machine": {"cpu_model": "x", "nproc": 2, "mem_gib": 1, "kernel": "k", "python": "3",
                    "versions": {}, "loadavg_before": [1.0], "loadavg_after": [1.0]},
        "mlp": {"devices": "cpu:2", "workers": {"asyncinfer": 2}, "one_client": one,
                "saturation": sat, "ours_saturation": 900.0, "loads": loads}}
    if device == "cpu":
        shed = [{"factor": f, "rate": 432 * f, "runs": [pt(g, 50, p99, goodput=g)]}
                for f, g, p99 in ((0.5, 216, 80), (1.0, 400, 190), (2.0, 300, 260))]
        res["synthetic"] = {
            "truth": {"a_s": 0.002, "b_s": 0.010}, "max_latency_ms": 200, "max_batch_size": 32,
            "batch1_ms": 12.0, "light": {"jobs": pt(25, 14.0, 20)},
            "one_client": {"jobs": [pt(60, 16.0, 20)]}, "fit": {"a_s": 0.0021, "b_s": 0.004},
            "shed": {"capacity_per_s": 432.0, "loads": shed}}
    return res


def by_what(ts: list[Target]) -> dict[str, Target]:
    return {t.what: t for t in ts}


def test_each_target_has_a_verdict_and_says_by_how_much_it_is_missed() -> None:
    t = by_what(targets(summary()))
    one = t["MLP, one client (jobs): p50 ≤ batch of one + 3 ms"]
    assert one.ok and one.margin == "1.0 ms to spare"
    assert t["MLP, one client (jobs-wait): p50 ≤ batch of one + 3 ms"].ok is False
    assert t["synthetic, one client (jobs): p50 ≤ 12 + 3 ms"].margin == "**1.0 ms over**"
    assert t["MLP, one client (jobs): jobs/s ≥ 1.5× BentoML workers=2"].ok
    good = t["MLP, saturation: goodput within 250 ms ≥ 3× BentoML workers=2"]
    assert good.ok and good.measured == "690 vs 200 jobs/s"  # each at its own saturation point
    cpu = t["MLP, saturation: jobs per CPU-second ≥ 2× BentoML workers=2"]
    assert cpu.ok and cpu.margin == "2.50× (goal 2×)"
    peak = t["shed mode at 2× capacity: goodput ≥ 90% of the peak"]
    assert peak.ok is False and "75%" in peak.margin and "15 points short" in peak.margin
    assert t["shed mode at 2× capacity: served p99 ≤ 200 ms"].margin == "**60.0 ms over**"
    assert t["synthetic fit after light load: a within 25% of the truth"].ok
    assert t["synthetic fit after light load: b within 25% of the truth"].margin == \
        "**off by 60%**"
    p50 = [x for w, x in t.items() if "50% of saturation" in w and "p50 ≤ BentoML" in w]
    assert p50 and p50[0].ok is True


def test_the_workers_reported_predict_time_is_set_beside_a_lone_jobs_latency(
        tmp_path: Path) -> None:
    reports = [{"rows": "1", "outcome": "ok", "predict_ms": "2.400"},
               {"rows": "1", "outcome": "ok", "predict_ms": "2.600"},
               {"rows": "1", "outcome": "ok", "predict_ms": "9.000"},
               {"rows": "5", "outcome": "ok", "predict_ms": "4.000"},
               {"rows": "1", "outcome": "failed", "predict_ms": "0.100"}]
    got = worker_predict(reports)
    assert got == {"batches": 4, "p50": 3.3, "mean_rows": 2.0}
    assert worker_predict([{"rows": "1", "outcome": "timeout", "predict_ms": "1"}]) is None
    res = summary()
    res["mlp"]["one_client"]["asyncinfer/jobs"][0]["worker_predict_ms"] = got
    res["synthetic"]["one_client"]["jobs"][0]["worker_predict_ms"] = {"p50": 12.4}
    t = by_what(targets(res))
    assert t["MLP, one client (jobs): p50 ≤ batch of one + 3 ms"].measured == \
        "4.0 ms vs 2.00 + 3 ms (predict in the worker: 3.30 ms)"
    write_report(tmp_path, {"cpu": res})
    page = (tmp_path / "benchmarks.md").read_text()
    assert "| 3.30 | 0.70 |" in page  # p50 4.0 less the workers' 3.3
    assert "| 1.0 | 12.40 |" in page  # the synthetic table: to client, then predict
    # The shed table: the gateway's legs and cores (1.0 CPU-s over a 10 s run).
    assert "| 4.0 | 1.0 | 1.0 | 0.10 |" in page


def test_without_bentoml_the_peer_targets_are_left_out() -> None:
    ts = targets(summary(bento=False))
    assert ts and not any("BentoML" in t.what for t in ts)


def test_the_page_renders_from_a_cpu_and_a_gpu_run(tmp_path: Path) -> None:
    write_report(tmp_path, {"cuda": summary("cuda", bento=False), "cpu": summary()})
    page = (tmp_path / "benchmarks.md").read_text()
    assert page.index("## CPU: headline") < page.index("## GPU: headline")
    assert "**missed**" in page and "shed mode" in page and "profile-table" in page
    for name in ("bench-latency", "bench-saturation", "bench-shed", "bench-latency-cuda"):
        assert (tmp_path / "img" / f"{name}.png").stat().st_size > 1000
        assert f"img/{name}.png" in page


def test_the_gpu_check_records_the_tables_headline(tmp_path: Path) -> None:
    # bench/gpu_status.py runs with any python3 (no project packages): as a script, like
    # bench/gpu_check.sh runs it.
    res = summary("cuda")
    res["limit"] |= {"best_rows_per_s": 500000.0, "best_batch_size": 64}
    (tmp_path / "summary.json").write_text(json.dumps(res))
    record, page = tmp_path / "gpu.json", tmp_path / "gpu.md"
    script = str(REPO / "bench" / "gpu_status.py")
    for args in (["init", record], ["table", record, tmp_path / "summary.json"],
                 ["report", record, page]):
        subprocess.run([sys.executable, script, *map(str, args)], check=True)
    bench = json.loads(record.read_text())["benchmark"]
    assert bench["one_client"]["asyncinfer/jobs"] == {"jobs_per_s": 200.0, "p50_ms": 4.0}
    assert bench["saturation"]["bentoml-w2"]["goodput_per_s"] == 200.0  # its best client count
    text = page.read_text()
    assert "one client, bentoml-w2: 100.0 jobs/s, p50 10.00 ms" in text
    assert "saturation, asyncinfer: 700.0 jobs/s at 64 clients" in text
    # A run that left no summary is recorded as such, not as the previous figures.
    subprocess.run([sys.executable, script, "table", str(record), str(tmp_path / "none.json")],
                   check=True)
    assert "error" in json.loads(record.read_text())["benchmark"]
