"""docs/benchmarks.md and docs/img/bench-*.png from a bench.run summary.

    python -m bench.report [bench/results/latest.json]     # redo the docs from saved results
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from bench.docs import REPO
from bench.systems import MAX_BATCH_SIZE, MAX_LATENCY_MS

OURS, BENTO = "asyncinfer", "bentoml"
COLORS = {OURS: "#1f77b4", BENTO: "#d62728"}


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _agg(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The median over repeats of each figure the report shows."""
    if not points:
        return None

    def lat(key: str) -> float | None:
        return _med([p["latency_ms"][key] for p in points])

    # One name per process kind ("redis-aof-rewrite 127.0.0.1:port" is a short-lived fork).
    cpu_s = [{k.split(" ")[0]: 0.0 for k in p["server_cpu_s"]} for p in points]
    for acc, p in zip(cpu_s, points, strict=True):
        for k, v in p["server_cpu_s"].items():
            acc[k.split(" ")[0]] += v
    names = sorted({k for acc in cpu_s for k in acc})

    return {
        "throughput": _med([p["throughput_per_s"] for p in points]),
        "offered": _med([p["offered_per_s"] for p in points]),
        "p50": lat("p50"), "p90": lat("p90"), "p99": lat("p99"),
        "batch": _med([p["batch_size"]["mean"] for p in points]),
        "ok": _med([p["ok_fraction"] for p in points]),
        "cpu_ms_per_job": _med([p["server_cpu_ms_per_job"] for p in points]),
        "cpu": {k: _med([acc.get(k, 0.0) / (p.get("wall_s") or p["window_s"])
                         for acc, p in zip(cpu_s, points, strict=True)])
                for k in names},
        "client_cpu": _med([p.get("client_cpu_fraction") for p in points]),
        # CPU ms per completed job, by process and for the generator (whole run / all its jobs)
        "cpu_ms_by_proc": {k: _med([1000 * acc.get(k, 0.0) / _jobs(p)
                                    for acc, p in zip(cpu_s, points, strict=True)])
                           for k in names},
        "gen_ms_per_job": _med([1000 * (p.get("client_cpu_s") or 0.0) / _jobs(p)
                                for p in points]),
        "concurrency": points[0].get("concurrency"),
        "statuses": points[-1]["status_counts"],
        "breakdown": _breakdown([p.get("breakdown_ms") for p in points]),
        "runs": [p["throughput_per_s"] for p in points],
        "run_concurrency": [p.get("concurrency") for p in points],
    }


def _runs_of(x: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An offered load's runs: a list of repeats (older results hold a single run)."""
    return x if isinstance(x, list) else [x]


def _jobs(p: dict[str, Any]) -> int:
    n = p.get("succeeded_total") or p.get("jobs_total") or p["status_counts"].get("succeeded", 0)
    return max(1, int(n))


def _breakdown(items: list[dict[str, float] | None]) -> dict[str, float] | None:
    got = [b for b in items if b]
    if not got:
        return None
    return {k: statistics.median(b[k] for b in got) for k in got[0]}


def overloaded(a: dict[str, Any] | None) -> bool:
    if a is None or not a["offered"]:
        return False
    return bool((a["ok"] or 0) < 0.99 or (a["throughput"] or 0) < 0.95 * a["offered"])


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    lim = res["limit"]
    http = res["http"]
    sysr = res["systems"]
    sat_o = _agg(sysr["sat"][OURS])
    sat_b = _agg(sysr["sat"][BENTO])
    light_o = _agg(sysr["light"][OURS])
    light_b = _agg(sysr["light"][BENTO])
    loads = [{"fraction": pt["fraction"], "rate": pt["rate"], OURS: _agg(_runs_of(pt[OURS])),
              BENTO: _agg(_runs_of(pt[BENTO])) if BENTO in pt else None}
             for pt in sysr["loads"]]
    triv_submit = _med(http["trivial_submit"])
    gw_submit = _med(http["gateway_submit"])
    triv_jobs = _med(http["trivial_jobs"])
    one = lim.get("one_worker") or lim
    a: dict[str, Any] = {
        "sat_o": sat_o, "sat_b": sat_b, "light_o": light_o, "light_b": light_b, "loads": loads,
        "triv_submit": triv_submit, "gw_submit": gw_submit, "triv_jobs": triv_jobs,
        "limit_rows": lim["best_rows_per_s"], "limit_batch": lim["best_batch_size"],
        "limit_predict_rows": lim["best_predict_rows_per_s"],
        "batch1_ms": one["batch1_forward_ms"], "batch1_predict_ms": one["batch1_predict_ms"],
    }
    s_o = sat_o["throughput"] if sat_o else None
    s_b = sat_b["throughput"] if sat_b else None
    a["ratio_bento"] = (s_o / s_b) if s_o and s_b else None
    a["ratio_submit"] = (gw_submit / triv_submit) if gw_submit and triv_submit else None
    a["ratio_limit"] = (s_o / a["limit_rows"]) if s_o else None
    a["ratio_http_jobs"] = (s_o / triv_jobs) if s_o and triv_jobs else None
    a["sat_wait"] = _agg(sysr.get("sat_wait") or [])
    a["light_wait"] = _agg(sysr.get("light_wait") or [])
    a["light_p50"] = light_o["p50"] if light_o else None
    a["light_budget"] = a["batch1_ms"] + 5.0
    a["handoff_ms"] = _med(sysr.get("light_handoff_ms") or [])
    return a


# -- formatting -------------------------------------------------------------------------------


def f0(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def f1(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def f2(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _lat_cell(x: dict[str, Any] | None) -> str:
    if x is None:
        return "– | – | – | – | –"
    flag = " (overloaded)" if overloaded(x) else ""
    return (f"{f0(x['throughput'])}{flag} | {f1(x['p50'])} | {f1(x['p99'])} | {f1(x['batch'])}"
            f" | {pct(x['ok'])}")


def _cpu_line(x: dict[str, Any] | None) -> str:
    if not x:
        return "–"
    parts = sorted(((k, v) for k, v in x["cpu"].items() if v and v >= 0.005),
                   key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.2f}" for k, v in parts)


def _runs(x: dict[str, Any] | None) -> str:
    """Each repeat's best throughput and the concurrency it came at."""
    if not x:
        return "–"
    return ", ".join(f"{f0(t)}" + (f" at C={c}" if c else "")
                     for t, c in zip(x["runs"], x["run_concurrency"], strict=True))


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def markdown(res: dict[str, Any], a: dict[str, Any]) -> str:
    m = res["machine"]
    v = m["versions"]
    prof = res["profile"]
    sysr = res["systems"]
    reps = prof["repeats"]
    sat_o, sat_b = a["sat_o"], a["sat_b"]
    light_o, light_b = a["light_o"], a["light_b"]
    t_bento = a["ratio_bento"] is not None and a["ratio_bento"] >= 3.0
    t_submit = a["ratio_submit"] is not None and a["ratio_submit"] >= 0.6
    t_light = a["light_p50"] is not None and a["light_p50"] <= a["light_budget"]
    bd = (light_o or {}).get("breakdown") or {}
    cmd = "python -m bench.run --" + res["mode"] + (
        f" --replicas {res['replicas']}" if res["replicas"] != 1 else "") + (
        " --device cuda" if res["device"] == "cuda" else "")
    L: list[str] = []
    add = L.append
    add("# Benchmarks\n")
    add("asyncinfer serving the built-in torch MLP (256 → 2048 → 2048 → 2048 → 16, fixed-seed "
        "weights) measured against the model's own limit, the bare HTTP server, and BentoML "
        "serving the same model with its adaptive batching, all in one run on one machine. "
        f"Generated by `{cmd}` (bench/run.py) on {res['started']}; raw JSON in "
        "`bench/results/` (not committed).\n")
    add("## Targets\n")
    add("| target | measured | ratio | verdict |")
    add("|---|---|---|---|")
    add(f"| saturation throughput through asyncinfer ≥ 3× BentoML's (same model, same load) | "
        f"{f0(sat_o and sat_o['throughput'])} vs {f0(sat_b and sat_b['throughput'])} jobs/s | "
        f"{f2(a['ratio_bento'])}× | {_verdict(t_bento if sat_b else None)} |")
    add(f"| gateway submit-path throughput ≥ 60% of the bare HTTP server's trivial endpoint | "
        f"{f0(a['gw_submit'])} vs {f0(a['triv_submit'])} req/s | {pct(a['ratio_submit'])} | "
        f"{_verdict(t_submit)} |")
    add(f"| p50 end-to-end at light load ≤ model batch-of-one + 5 ms | p50 {f1(a['light_p50'])} ms"
        f" vs {f2(a['batch1_ms'])} + 5 = {f1(a['light_budget'])} ms | "
        f"{f2((a['light_p50'] or 0) / a['light_budget'])}× the budget | {_verdict(t_light)} |")
    sw = a["sat_wait"]
    if sw and sat_b:
        ratio_w = sw["throughput"] / sat_b["throughput"]
        add(f"| *the first target with `Prefer: wait`* (one request per job, like BentoML's "
            f"endpoint) | {f0(sw['throughput'])} vs {f0(sat_b['throughput'])} jobs/s | "
            f"{f2(ratio_w)}× | {_verdict(ratio_w >= 3)} |")
    add("")
    add("What bounds each figure is discussed under [Reading the results](#reading-the-results)."
        "\n")
    add("## Results\n")
    add(f"Medians of {reps} interleaved repeat(s) ({prof.get('light_repeats', reps)} at light "
        f"load, {prof.get('load_repeats', 1)} at each other offered load). Throughput counts "
        "successful jobs only; latency is from a job's arrival to its final answer.\n")
    add("### Limits and ratios\n")
    add("| what | figure | asyncinfer as a ratio of it |")
    add("|---|---|---|")
    add(f"| torch model alone, best batch ({a['limit_batch']}), one process, "
        f"{res['replicas']} × 1 thread | {f0(a['limit_rows'])} rows/s | "
        f"{pct(a['ratio_limit'])} |")
    add(f"| the model's `predict` (tensor from Python floats, lists back), best batch | "
        f"{f0(a['limit_predict_rows'])} rows/s | – |")
    add(f"| model batch-of-one time (forward / predict) | {f2(a['batch1_ms'])} / "
        f"{f2(a['batch1_predict_ms'])} ms | – |")
    add(f"| bare HTTP server, trivial submit endpoint (C={prof['http_concurrency']}) | "
        f"{f0(a['triv_submit'])} req/s | gateway submit path: {pct(a['ratio_submit'])} |")
    add(f"| gateway submit path alone (Redis + gateway, C={prof['http_concurrency']}) | "
        f"{f0(a['gw_submit'])} req/s | – |")
    add(f"| bare HTTP server, whole job pattern (submit + long-poll, C="
        f"{prof['http_concurrency']}) | {f0(a['triv_jobs'])} jobs/s | "
        f"{pct(a['ratio_http_jobs'])} |")
    add(f"| **asyncinfer**, saturation (closed loop, best of C={prof['sat_concurrency']}) | "
        f"**{f0(sat_o and sat_o['throughput'])} jobs/s** (runs: {_runs(sat_o)}) | – |")
    sw = a["sat_wait"]
    if sw:
        add(f"| asyncinfer, saturation with `Prefer: wait` on the submit (one request per job, "
            f"C={sw.get('concurrency') or '?'}) | {f0(sw['throughput'])} jobs/s (runs: "
            f"{', '.join(f0(x) for x in sw['runs'])}) | – |")
    add(f"| **BentoML**, saturation (same) | **{f0(sat_b and sat_b['throughput'])} jobs/s** "
        f"(runs: {_runs(sat_b)}) | "
        f"asyncinfer is {f2(a['ratio_bento'])}× |")
    for name, x in ((OURS, sat_o), (BENTO, sat_b)):
        if x and x["cpu_ms_per_job"]:
            add(f"| {name}: jobs per CPU-second at saturation (all its processes) | "
                f"{f0(1000 / x['cpu_ms_per_job'])} | – |")
    over = sysr.get("overload") or {}
    if over:
        cells = []
        for name in (OURS, BENTO):
            if name in over:
                x = over[name]
                bad = {k: v for k, v in x["status_counts"].items()
                       if k not in ("succeeded", "unfinished") and v}
                cells.append(f"{name} {f0(x['throughput_per_s'])} jobs/s ok"
                             + "".join(f", {v} × {k}" for k, v in bad.items()))
        add(f"| past saturation: closed loop C={prof.get('overload_concurrency')} (once) | "
            f"{'; '.join(cells)} | – |")
    add("")
    add("### Latency at offered loads (open loop, Poisson arrivals)\n")
    add("The same offered rates for both systems: light load, then fractions of asyncinfer's "
        "saturation throughput. Per system: achieved jobs/s, p50 and p99 latency (ms), mean batch"
        " size, share of jobs that succeeded.\n")
    add("| offered jobs/s | of our saturation | asyncinfer jobs/s | p50 | p99 | batch | ok | "
        "BentoML jobs/s | p50 | p99 | batch | ok |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    sat_thr = sat_o["throughput"] if sat_o else None
    rows = [(prof["light_rate"], light_o, light_b)]
    rows += [(pt["rate"], pt[OURS], pt[BENTO]) for pt in a["loads"]]
    for rate, o, b in rows:
        frac = pct(rate / sat_thr) if sat_thr else "–"
        add(f"| {f0(rate)} | {frac} | {_lat_cell(o)} | {_lat_cell(b)} |")
    add("")
    lw = a["light_wait"]
    if lw:
        add(f"With `Prefer: wait` on the submit (one request per job) asyncinfer's light-load "
            f"p50 is {f1(lw['p50'])} ms and p99 {f1(lw['p99'])} ms.\n")
    add("*overloaded*: fewer than 99% of jobs succeeded or under 95% of the offered rate was "
        "served; BentoML answers 503 (`process is overloaded`) to requests its dispatcher "
        f"expects to miss `max_latency_ms={MAX_LATENCY_MS}`, and only successes count.\n")
    add("### Where the CPU went at saturation\n")
    add("CPU cores used by each system's processes while it was driven to saturation (the "
        "generator's own share is separate), and CPU milliseconds per successful job.\n")
    add("| system | cores by process | total cores | CPU ms per job | generator cores |")
    add("|---|---|---|---|---|")
    for name, x in ((OURS, sat_o), (BENTO, sat_b)):
        if x:
            add(f"| {name} | {_cpu_line(x)} | {f2(sum(v or 0 for v in x['cpu'].values()))} | "
                f"{f2(x['cpu_ms_per_job'])} | {f2(x.get('client_cpu'))} |")
    add("")
    if bd:
        add("### Where a job's time goes at light load (asyncinfer)\n")
        add("Medians from the job records' wall-clock stamps (millisecond resolution):\n")
        add("| leg | ms |")
        add("|---|---|")
        add(f"| client sends → gateway wrote the record (HTTP, parse, validate, Lua submit) | "
            f"{f1(bd.get('to_record'))} |")
        add(f"| queued: batcher read, CORK decision, Celery hand-off, worker pick-up | "
            f"{f1(bd.get('queued'))} |")
        if a["handoff_ms"] is not None:
            add(f"| … of which the Celery hand-off: the batcher's `send_task` to the worker's "
                f"task starting (median of the batcher's last 50 batches, sub-millisecond) | "
                f"{f1(a['handoff_ms'])} |")
        add(f"| running: fetch, preprocess, predict, postprocess, write final state | "
            f"{f1(bd.get('running'))} |")
        add(f"| final state → client has the answer (pub/sub, fetch, HTTP) | "
            f"{f1(bd.get('to_client'))} |")
        add(f"| **end to end (p50)** | **{f1(a['light_p50'])}** |")
        add("")
    others = _other_configs(res)
    if others:
        add("### Other configurations\n")
        add("The latest saved run of each other worker count (bench/results/*/summary.json; "
            "`--replicas N` gives each system N model workers: `ASYNCINFER_DEVICES=cpu:N` and "
            "BentoML `workers=N`). Medians of that run's repeats.\n")
        add("| run | asyncinfer saturation | BentoML saturation | ratio | CPU ms per job "
            "(asyncinfer / BentoML) | light p50 (asyncinfer / BentoML) |")
        add("|---|---|---|---|---|---|")
        for label, o in others:
            oa = analyse(o)
            so, sb = oa["sat_o"], oa["sat_b"]
            add(f"| {label} | {f0(so and so['throughput'])} | {f0(sb and sb['throughput'])} | "
                f"{f2(oa['ratio_bento'])}× | {f2(so and so['cpu_ms_per_job'])} / "
                f"{f2(sb and sb['cpu_ms_per_job'])} | {f1(oa['light_p50'])} / "
                f"{f1(oa['light_b'] and oa['light_b']['p50'])} ms |")
        add("")
    add("### Plots\n")
    add("![latency vs offered load](img/bench-latency.png)\n")
    add("![throughput and batch size vs offered load](img/bench-throughput.png)\n")
    add("![limits](img/bench-limits.png)\n")
    add(reading(res, a))
    add(METHOD.format(
        devices=sysr["devices"], replicas=res["replicas"], max_batch=MAX_BATCH_SIZE,
        max_latency=MAX_LATENCY_MS, duration=prof["duration_s"], warmup=prof["warmup_s"],
        reps=reps, sat_c=prof["sat_concurrency"], light=prof["light_rate"],
        fractions=", ".join(pct(x) for x in prof["fractions"]), http_c=prof["http_concurrency"],
        gen_us=f1(res["http"].get("generator_cpu_us_per_request")),
        gen_frac=pct(res["http"].get("generator_cpu_fraction")),
        gen_rps=f0(res["http"].get("generator_requests_per_s")),
        lag99=f1(_max_lag(res)),
        gen_cap=f0((res["http"].get("generator_requests_per_s") or 0)
                   / (res["http"].get("generator_cpu_fraction") or 1)),
    ))
    add("## Machine\n")
    add("| | |")
    add("|---|---|")
    add(f"| CPU | {m['cpu_model']}, {m['nproc']} cores (nproc) |")
    add(f"| memory | {m['mem_gib']} GiB |")
    add(f"| kernel, Python | {m['kernel']}, {m['python']} |")
    add(f"| redis-server | {m['redis_server'][:80]} |")
    add("| packages | " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())) + " |")
    add(f"| load average before / after | {', '.join(f'{x:.2f}' for x in m['loadavg_before'])}"
        f" / {', '.join(f'{x:.2f}' for x in m.get('loadavg_after', []))} |")
    add(f"| run | `{res['mode']}`, device {res['device']}, {res['replicas']} model worker(s) per "
        f"system, {res['elapsed_s']:.0f} s |")
    add("")
    spread = []
    for name, x in ((OURS, sat_o), (BENTO, sat_b)):
        if x and x["runs"]:
            spread.append(f"{name} {f0(min(x['runs']))}–{f0(max(x['runs']))}")
    add("Other engineers' test suites and benchmarks shared this 2-core machine during the runs "
        "(see the load averages), so single figures are noisy — the saturation runs ranged "
        + ", ".join(spread) + " jobs/s. The repeats are interleaved across systems so that "
        "noise hits both alike, the tables show medians, and CPU per job (read from /proc, so "
        "unaffected by how many cores were free) is the steadier comparison.\n")
    add(REPRODUCE)
    add(PROFILING)
    return "\n".join(L).rstrip() + "\n"


def _other_configs(res: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The newest saved run for each (replicas, device) other than this run's."""
    import json

    found: dict[tuple[int, str], tuple[str, dict[str, Any]]] = {}
    for path in sorted((REPO / "bench" / "results").glob("*/summary.json")):
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        key = (int(other.get("replicas", 1)), str(other.get("device", "cpu")))
        if key == (res["replicas"], res["device"]) or "systems" not in other:
            continue
        label = (f"`--{other['mode']} --replicas {key[0]}` on {key[1]} "
                 f"({other.get('started', '')[:16]})")
        found[key] = (label, other)  # sorted by folder name, i.e. by time: the last wins
    return [found[k] for k in sorted(found)]


def _max_lag(res: dict[str, Any]) -> float | None:
    sysr = res["systems"]
    points = [p for lst in sysr["light"].values() for p in lst] + list(sysr.get("light_wait", []))
    points += [r for pt in sysr["loads"] for k in (OURS, BENTO) if k in pt
               for r in _runs_of(pt[k])]
    lags = [(p.get("issue_lag_ms") or {}).get("p99") for p in points]
    vals = [x for x in lags if x is not None]
    return max(vals) if vals else None


def reading(res: dict[str, Any], a: dict[str, Any]) -> str:
    """The discussion of the figures; every number in it comes from this run."""
    sat_o, sat_b, light_o = a["sat_o"], a["sat_b"], a["light_o"]
    if not sat_o:
        return ""
    cores = res["machine"]["nproc"] or 2
    thr = sat_o["throughput"]
    per_proc = {k: v for k, v in sat_o["cpu_ms_by_proc"].items() if (v or 0) >= 0.005}
    gen_ms = sat_o["gen_ms_per_job"] or 0.0
    cpu_o = sat_o["cpu_ms_per_job"] or sum(per_proc.values())
    cap = 1000 * cores / (cpu_o + gen_ms) if cpu_o else None
    procs = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per_proc.items(), key=lambda kv: -kv[1]))
    used = sum(v or 0 for v in sat_o["cpu"].values()) + (sat_o.get("client_cpu") or 0)
    http_job_ms = (res["http"].get("trivial_jobs_cpu_us_per_job") or 0) / 1000
    row_ms = 1000 / a["limit_rows"]
    gw_ms = per_proc.get("gateway") or 0.0
    worker_ms = sum(v for k, v in per_proc.items() if k.startswith("worker"))
    out = ["## Reading the results\n"]
    out.append(
        f"**What bounds throughput.** CPU: at saturation the runs used {f2(used)} of the "
        f"{cores} cores. asyncinfer served {f0(thr)} jobs/s with batches of "
        f"{f1(sat_o['batch'])} on average; each job cost {f2(cpu_o)} ms of CPU across its "
        f"processes ({procs}) plus {f2(gen_ms)} ms in the load generator, so {cores} cores / "
        f"{f2(cpu_o + gen_ms)} ms ≈ {f0(cap)} jobs/s is the ceiling. Of the worker's "
        f"{f2(worker_ms)} ms, the model's forward pass is about {f2(row_ms)} ms per row at its "
        f"best batch (more at smaller batches); the rest is JSON in and out, Celery and the two "
        f"batch-wide Redis scripts. Of the gateway's {f2(gw_ms)} ms, the two HTTP requests of a "
        f"job cost the bare server {f2(http_job_ms)} ms; the rest is parsing and validating 256 "
        f"floats, the submit script, the pub/sub wake-up and building two job bodies.\n")
    sw = a["sat_wait"]
    if sat_b:
        need = 3 * sat_b["throughput"]
        budget = 1000 * cores / need
        b_cores = sum(v or 0 for v in sat_b["cpu"].values())
        wait_ratio = (sw["throughput"] / sat_b["throughput"]) if sw else None
        verdict = ("The 3× target is met." if (a["ratio_bento"] or 0) >= 3 else
                   f"The 3× target is not met with two requests per job: asyncinfer is "
                   f"{f2(a['ratio_bento'])}× BentoML, {f2(3 / (a['ratio_bento'] or 1))}× short. "
                   f"3× would be {f0(need)} jobs/s: at most {f2(budget)} ms of CPU per job "
                   f"with every one of the {cores} cores busy, against "
                   f"{f2(cpu_o + gen_ms)} ms now with {f2(used)} cores busy (the rest is idle "
                   f"time at the hand-offs between processes).")
        out.append(
            f"**asyncinfer vs BentoML ({f2(a['ratio_bento'])}×).** BentoML with one worker does "
            f"HTTP, batching and the model in one process: it used {f2(b_cores)} cores and "
            f"{f2(sat_b['cpu_ms_per_job'])} ms of CPU per job (asyncinfer: {f2(cpu_o)} ms), "
            f"with batches of {f1(sat_b['batch'])}. One process's GIL caps it near one core, "
            f"and past its peak its dispatcher answers 503 to requests it expects to miss "
            f"`max_latency_ms` (the overloaded rows above), while asyncinfer spreads the work "
            f"over its processes and keeps every accepted job. {verdict}"
            + (f" With `Prefer: wait` (one request per job, the contract's synchronous form, "
               f"which is what BentoML's endpoint is) asyncinfer serves {f0(sw['throughput'])} "
               f"jobs/s, {f2(wait_ratio)}× BentoML." if sw and wait_ratio else "") + "\n")
    ts, gs = a["triv_submit"], a["gw_submit"]
    t_us = _med(res["http"].get("trivial_submit_cpu_us") or [])
    g_us = _med(res["http"].get("gateway_submit_cpu_us") or [])
    r_us = _med(res["http"].get("gateway_submit_redis_cpu_us") or [])
    if ts and gs:
        out.append(
            f"**Gateway submit path ({pct(a['ratio_submit'])} of the bare server: {f0(gs)} vs "
            f"{f0(ts)} requests/s; target 60%: "
            f"{'met' if (a['ratio_submit'] or 0) >= 0.6 else 'not met'}).** Both are one "
            f"uvicorn process built the same way (the same two plain Starlette job routes, the "
            f"same JSON encoder, FastAPI's telemetry hooks off), so CPU per request sets the "
            f"ceiling: the trivial route costs {f0(t_us)} µs per request, the gateway's submit "
            f"{f0(g_us)} µs (plus {f0(r_us)} µs in Redis for the Lua script and its append-only "
            f"file). The difference, {f0((g_us or 0) - (t_us or 0))} µs, is the submit's own "
            f"work: reading the body and parsing, validating and re-encoding the 256-float input "
            f"once (about 25 µs in-process, see *Hot path*), the id, the one Redis call through "
            f"the pipelined client, the 202 body and the metrics. 60% would leave "
            f"{f0((t_us or 0) / 0.6 - (t_us or 0))} µs for all of that. The bare server got "
            f"cheaper in this change too (the lean routes apply to it), which lowers the ratio "
            f"while the gateway's own submit throughput went up (see *Hot path*).\n")
    bd = (light_o or {}).get("breakdown") or {}
    lw = a["light_wait"]
    if light_o:
        over = (a["light_p50"] or 0) - a["light_budget"]
        out.append(
            f"**Light-load latency (p50 {f1(a['light_p50'])} ms vs {f1(a['light_budget'])} ms = "
            f"batch of one {f2(a['batch1_ms'])} ms + 5 ms: "
            + ("met" if over <= 0 else f"not met, {f1(over)} ms over") + ").** "
            f"The legs (job-record stamps, whole milliseconds): {f1(bd.get('to_record'))} ms "
            f"from the client to the job record, {f1(bd.get('queued'))} ms queued (the batcher's "
            f"stream read and CORK decision — a lone request is released at once —, the hand-"
            f"over of its stream entry, the Celery message through Redis and the worker's "
            f"consumer picking it up), {f1(bd.get('running'))} ms in the worker (the model's "
            f"`predict` is {f2(a['batch1_predict_ms'])} ms of it; the rest is the start and "
            f"finish scripts and the hand-offs to the pre/postprocess and predict threads) and "
            f"{f1(bd.get('to_client'))} ms back (the final message, the waiting request, HTTP). "
            f"Each leg is a hop between processes or threads on two shared cores; the Celery "
            f"hand-off is the largest"
            + (f" ({f1(a['handoff_ms'])} ms from the batcher's `send_task` to the task "
               f"starting in the worker: kombu's publish, the worker's consumer and its thread "
               f"pool)" if a["handoff_ms"] is not None else "")
            + ", more than the 5 ms budget leaves after the other legs. "
            + (f"With `Prefer: wait` on the submit (one request instead of two) p50 is "
               f"{f1(lw['p50'])} ms. " if lw else "")
            + f"BentoML keeps a request in one process yet shows p50 "
            f"{f1(a['light_b'] and a['light_b']['p50'])} ms here, because its dispatcher waits "
            f"for company before it runs a batch.\n")
    out.append(
        "**What would move the figures next.** The batcher counts a worker's spare slot (the one "
        "that lets the next batch be fetched while a predict runs) as capacity and releases into "
        "it at once; a batch sent there only waits for the predict lane, so releasing it just "
        "in time would make batches larger at the same latency (fewer, cheaper predicts per "
        "job). The Celery hand-off costs the light-load path about as much as the model. And "
        "on a machine with more cores, a second gateway process (the gateway is the busiest "
        "process and single-threaded).\n")
    return "\n".join(out)


METHOD = """## Method

- **Same model, same batching limits.** asyncinfer serves `workers.builtin.mlp:MLPModel`;
  BentoML (bench/bentoml_service/service.py, `@bentoml.api(batchable=True,
  max_batch_size={max_batch}, max_latency_ms={max_latency})`, synchronous endpoint) serves the
  network from the same `build_mlp()` (same fixed-seed weights).
- **Same CPU budget.** Both systems get the whole machine and {replicas} model worker(s) with one
  torch thread each. asyncinfer runs via `asyncinfer up --no-flower` with
  `ASYNCINFER_DEVICES={devices}` and a models file that fixes `min_workers = max_workers =
  {replicas}` (no scale-from-zero during a run): each worker's model thread is pinned to its own
  core (core 0 for one worker) with one torch thread, as the launcher does; the rest of the
  worker, the gateway, batcher, autoscaler and Redis float over both cores. BentoML runs
  `bentoml serve` with `workers={replicas}`, `threads=1`, one torch thread per worker,
  unpinned. The generator is a separate process,
  unpinned. Both systems are up at once and driven in turn (the other one idles), repeat after
  repeat, so that noise from other work on the machine hits both alike.
- **Model limit.** `bench/model_limit.py`: the model in one process pinned like a worker (one
  core, one torch thread), no HTTP, no Redis; batch sizes 1…64, the best rows/s and the
  batch-of-one time. Both the pure forward pass and the model's `predict` (which builds the
  tensor from Python floats) are timed.
- **Bare HTTP server.** `bench/trivial_server.py`: FastAPI on uvicorn built like the gateway
  (uvicorn settings, telemetry off, the two job routes as plain Starlette routes, the same JSON
  encoder), the same routes doing nothing. The submit-path ratio drives it and the gateway alone
  (a private Redis plus `python -m gateway`, nothing consuming the queue) with the same body,
  same closed-loop concurrency (C={http_c}), in alternation.
- **Load generator.** `bench/loadgen.py`, its own process on uvloop. Open loop: Poisson
  arrivals at a set rate, latency measured from the scheduled arrival (no coordinated omission),
  at most 2,048 jobs in flight. Closed loop: C clients back to back. A job is POST submit then
  GET `/v1/jobs/{{id}}?wait=30` until final (asyncinfer), or one POST to `/predict` (BentoML).
  It speaks HTTP/1.1 over a keep-alive pool with a small client of its own: httpx was measured
  first and cost about 2.6 ms of CPU per request (about 180 jobs/s at most), far below what it
  had to drive; the own client costs {gen_us} µs per request. Against the trivial server it
  sustained {gen_rps} requests/s while using {gen_frac} of one core (a ceiling of about
  {gen_cap} requests/s on a core of its own), several times what any system here served, so it
  is not what limits any figure. Open-loop arrivals left on schedule: the worst p99 delay of an
  arrival behind its scheduled time, over all open-loop runs, was {lag99} ms.
- **Loads.** Saturation: closed loop at C = {sat_c} (best kept). Light load: open loop at
  {light} jobs/s. Then open loop at {fractions} of asyncinfer's measured saturation throughput,
  the same absolute rates for BentoML. Each run: {duration} s of arrivals, the first {warmup} s
  left out of the figures, then up to 20 s for stragglers; between runs each system is let drain
  (asyncinfer until its queue is empty).
- **Statistics.** Throughput = successful completions inside the measured window per second;
  p50/p99 over the jobs that arrived in the window and succeeded (failures are counted, not
  timed); batch size = mean of `metrics.batch_size` of the jobs (asyncinfer) or of BentoML's
  `bentoml_service_adaptive_batch_size` histogram over the run. CPU per process is read from
  /proc before and after each run.
"""

REPRODUCE = """## Reproduce

```bash
python -m bench.run --quick            # ~4 min: one repeat, shorter runs
python -m bench.run --full             # ~15 min: 3 interleaved repeats (these figures)
python -m bench.run --full --replicas 2   # two model workers per system (cpu:2, workers=2)
python -m bench.run --full --device cuda  # on a GPU (ASYNCINFER_DEVICES=cuda); skips without one
python -m bench.report bench/results/latest.json   # redo this page and the plots from saved JSON
```

The first run makes BentoML's own virtual environment under bench/results/.venv-bentoml
(`pip install torch==2.13.0` — the pinned CPU build — then `pip install bentoml`). Pieces run on
their own too: `python -m bench.loadgen --help`, `python -m bench.model_limit`,
`python -m bench.trivial_server --port 8123`, `python -m bench.profile_hotpath`.
"""

PROFILING = """## Hot path

Profiled with py-spy (`python -m bench.profile_hotpath --spy`: the gateway alone under a
closed-loop submit load, then the whole stack under the job pattern, each process sampled),
timed in-process piece by piece, and counted with Redis `INFO commandstats`. What was found and
changed, largest first:

- **Celery's threads pool left the next batch waiting (celery/celery#6941).** With prefetch
  off, the worker takes its next message only on an iteration of its event loop, and a task
  finishing in a pool thread does not wake it; with task events off each batch waited for a
  timer tick (about 2 s), and with them on the events' flush happened to wake it. The worker
  now runs `workers.pool.WakingThreadPool`, which wakes the loop when a task's completion is
  recorded.
- **Celery task events only when watched.** They cost the batcher and the worker a Redis
  publish per task. Flower turns them on by itself (its `enable_events` timer) while it runs;
  `ASYNCINFER_TASK_EVENTS=true` keeps them on for other monitors.
- **The gateway's Redis calls go through one pipelined connection** (`shared/muxredis.py`):
  redis-py's per-command machinery (pool checkout, timeouts, retry wrapper, Python packing)
  was about a third of the gateway's CPU per job. Commands are packed by hiredis, written
  together once per event-loop iteration, and answered in order.
- **A long-poll needs no Redis read.** The finish script publishes the final record with the
  id; jobs this gateway submitted are watched from before their submit, so a long-poll on one
  answers from the message (or waits for it) with no `HGETALL`; anything else reads as before.
- **One script call per batch** for the worker's start and finish (was one per job, pipelined).
- **The two job routes are plain Starlette routes** (FastAPI's parameter solving cost about
  30 µs per request) and FastAPI's OpenTelemetry hooks are off; responses are encoded with
  pydantic-core. The bare server in these benchmarks is built the same way.
- **Only the model's thread is pinned to the worker's core**; the Celery consumer and the Redis
  I/O loop float (pinning the whole process made them queue behind the model on its core).
- Earlier (previous change): submit is one `EVALSHA`; the body is parsed once by pydantic-core;
  per-item pre/postprocess use at most 4 thread lanes per batch.

Commands per job (commandstats over the stack run below, which counts the commands a script
runs too): 1.1 `evalsha` (the submit, plus the worker's two per batch) and one `hgetall`, inside
the finish script, which reads the record it publishes; before, the gateway read each record
1.8 times per job. In all, 20.9 commands per job instead of 27.4.

Before/after, measured by `python -m bench.profile_hotpath --before <copy of the code before
these changes> --repeats 2 --write-docs` (medians of alternating runs, same machine, same
session). The in-process rows are steady; the end-to-end rows ran on a shared machine:

{profile_table}
"""


def write_report(res: dict[str, Any], docs: Path, profile_table: str | None = None) -> None:
    a = analyse(res)
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    plots(res, a, img)
    text = markdown(res, a)
    table = profile_table if profile_table is not None else _profile_table(docs)
    text = text.replace("{profile_table}", table)
    (docs / "benchmarks.md").write_text(text)


PROFILE_START, PROFILE_END = "<!-- profile-table -->", "<!-- /profile-table -->"


def _profile_table(docs: Path) -> str:
    """The before/after table is measured by bench.profile_hotpath, which writes it into
    docs/benchmarks.md between markers; a new report keeps what is there."""
    path = docs / "benchmarks.md"
    old = path.read_text() if path.exists() else ""
    if PROFILE_START in old and PROFILE_END in old:
        body = old[old.index(PROFILE_START) + len(PROFILE_START):old.index(PROFILE_END)]
        return f"{PROFILE_START}{body}{PROFILE_END}"
    return f"{PROFILE_START}\n(run `python -m bench.profile_hotpath` to measure.)\n{PROFILE_END}"


# -- plots ------------------------------------------------------------------------------------


def plots(res: dict[str, Any], a: dict[str, Any], img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = res["profile"]
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {OURS: [], BENTO: []}
    for name, light in ((OURS, a["light_o"]), (BENTO, a["light_b"])):
        if light:
            series[name].append((prof["light_rate"], light))
    for pt in a["loads"]:
        for name in (OURS, BENTO):
            if pt.get(name):
                series[name].append((pt["rate"], pt[name]))
    sat = {OURS: a["sat_o"], BENTO: a["sat_b"]}

    # latency vs offered load
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, pts in series.items():
        if not pts:
            continue
        xs = [x for x, _ in pts]
        for key, style in (("p50", "-"), ("p99", "--")):
            ys = [p[key] for _, p in pts]
            ax.plot(xs, ys, style, color=COLORS[name], marker="o", label=f"{name} {key}")
        for x, p in pts:
            if overloaded(p):
                ax.plot([x], [p["p99"]], "x", color="black", markersize=9)
        s = sat[name]
        if s:
            ax.axvline(s["throughput"], color=COLORS[name], alpha=0.3, lw=6,
                       label=f"{name} saturation ({s['throughput']:.0f}/s)")
    ax.axhline(a["batch1_ms"], color="gray", ls=":", label=f"model batch of one "
               f"({a['batch1_ms']:.2f} ms)")
    ax.axhline(a["light_budget"], color="green", ls=":", label=f"light-load target "
               f"({a['light_budget']:.1f} ms)")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (jobs/s, Poisson)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("Latency vs offered load (× = overloaded: <99% ok or <95% served)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "bench-latency.png", dpi=110)
    plt.close(fig)

    # throughput and batch size vs offered load
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    top = 1.0
    for name, pts in series.items():
        if not pts:
            continue
        xs = [x for x, _ in pts]
        ax1.plot(xs, [p["throughput"] for _, p in pts], "-o", color=COLORS[name], label=name)
        ax2.plot(xs, [p["batch"] or 0 for _, p in pts], "-o", color=COLORS[name], label=name)
        top = max(top, *xs)
        s = sat[name]
        if s:
            ax1.axhline(s["throughput"], color=COLORS[name], ls="--", alpha=0.6,
                        label=f"{name} saturation {s['throughput']:.0f}/s")
            ax2.plot([top * 1.05], [s["batch"] or 0], "*", color=COLORS[name], markersize=12,
                     label=f"{name} at saturation")
    ax1.plot([0, top], [0, top], ":", color="gray", label="served = offered")
    highest = max([top] + [s["throughput"] for s in sat.values() if s])
    ax1.set_ylim(0, highest * 1.3)
    ax1.set_xlabel("offered load (jobs/s)")
    ax1.set_ylabel("served (successful jobs/s)")
    ax1.set_title(f"Throughput (off the chart: model alone {a['limit_rows']:,.0f} rows/s,\n"
                  f"bare HTTP with the same request pattern {a['triv_jobs'] or 0:,.0f} jobs/s)",
                  fontsize=10)
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("offered load (jobs/s)")
    ax2.set_ylabel("mean batch size")
    ax2.set_title(f"Batch size (max {MAX_BATCH_SIZE})")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "bench-throughput.png", dpi=110)
    plt.close(fig)

    # limits
    bars = [
        ("torch model alone (rows/s)", a["limit_rows"], "gray"),
        ("model predict() (rows/s)", a["limit_predict_rows"], "gray"),
        ("bare HTTP: trivial submit (req/s)", a["triv_submit"], "black"),
        ("gateway submit path (req/s)", a["gw_submit"], COLORS[OURS]),
        ("bare HTTP: submit + poll (jobs/s)", a["triv_jobs"], "black"),
        ("asyncinfer saturation (jobs/s)", sat[OURS] and sat[OURS]["throughput"], COLORS[OURS]),
        ("BentoML saturation (jobs/s)", sat[BENTO] and sat[BENTO]["throughput"], COLORS[BENTO]),
    ]
    bars = [(n, v, c) for n, v, c in bars if v]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([n for n, _, _ in bars], [v for _, v, _ in bars], color=[c for _, _, c in bars])
    for i, (_, val, _) in enumerate(bars):
        ax.text(val * 1.02, i, f"{val:,.0f}", va="center", fontsize=8)
    ax.set_xlim(0, max(v for _, v, _ in bars) * 1.15)
    ax.invert_yaxis()
    ax.set_title("Limits and systems on this machine (per second)")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(img / "bench-limits.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import json

    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0]) if args else REPO / "bench" / "results" / "latest.json"
    write_report(json.loads(path.read_text()), REPO / "docs")
    print(f"wrote {REPO / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
