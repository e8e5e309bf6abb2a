"""docs/benchmarks.md and docs/img/bench-*.png from the published bench.run summaries
(docs/bench-data/<device>/summary.json: cpu, and cuda when a GPU run was published).

    python -m bench.report          # redo the page and the plots from the published JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.analysis import (
    BENTO1,
    BENTO2,
    MLP_SLO_MS,
    OURS,
    Target,
    at_least,
    mlp_figures,
    overloaded,
    ratio,
    synthetic_figures,
    targets,
)
from bench.docs import DOCS
from bench.reporttext import LONE_JOB, METHOD, REPRODUCE, lone_batch_table, profile_section

NAMES = {OURS: "asyncinfer", BENTO2: "BentoML workers=2", BENTO1: "BentoML workers=1",
         f"{OURS}/jobs": "asyncinfer, submit + long-poll",
         f"{OURS}/jobs-wait": "asyncinfer, `Prefer: wait`"}
DEVICE_TITLE = {"cpu": "CPU", "cuda": "GPU"}


def f0(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def f1(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def f2(v: float | None) -> str:
    return "–" if v is None else f"{v:,.2f}"


def pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def xr(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _verdict(t: Target) -> str:
    return "n/a" if t.ok is None else ("met" if t.ok else "**missed**")


def load_published(data: Path) -> dict[str, dict[str, Any]]:
    """The published summary of each device that has one."""
    out = {}
    for device in ("cpu", "cuda"):
        path = data / device / "summary.json"
        if path.exists():
            out[device] = json.loads(path.read_text())
    return out


# -- sections ---------------------------------------------------------------------------------


def headline(res: dict[str, Any], L: list[str]) -> None:
    m = mlp_figures(res)
    so, sb, s1 = (m["sat"].get(k) for k in (OURS, BENTO2, BENTO1))
    sw = m["sat"].get(f"{OURS}/jobs-wait")
    if not so:
        return
    L.append("| at saturation (MLP, closed loop) | asyncinfer | `Prefer: wait` | BentoML "
             "workers=2 | BentoML workers=1 | asyncinfer ÷ BentoML workers=2 |")
    L.append("|---|---|---|---|---|---|")
    pts = [x and x["point"] for x in (so, sw, sb, s1)]

    def row(label: str, key: str, fmt: Any = f0, better: str = "high") -> None:
        vals = [p and p.get(key) for p in pts]
        r = ratio(vals[0], vals[2]) if better == "high" else ratio(vals[2], vals[0])
        L.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + f" | {xr(r)} |")

    row(f"**goodput**: jobs/s finished within max_latency_ms={MLP_SLO_MS:g}", "goodput")
    row("**jobs per CPU-second** (all the system's processes)", "jobs_per_cpu_s")
    row("latency p50 at the saturation point (ms)", "p50", f1, "low")
    row("latency p99 at the saturation point (ms)", "p99", f1, "low")
    row("throughput at that point (jobs/s, any latency)", "throughput")
    L.append("| clients at that point | " + " | ".join(
        f0(p and p.get("concurrency")) for p in pts) + " | |")
    L.append("")
    for label, key, goal in (("Goodput within max_latency_ms", "goodput", 3.0),
                             ("Jobs per CPU-second", "jobs_per_cpu_s", 2.0)):
        parts = []
        for name, p in (("submit + long-poll", pts[0]), ("`Prefer: wait`", pts[1])):
            ok, why = at_least(ratio(p and p.get(key), pts[2] and pts[2].get(key)), goal)
            if ok is not None:
                parts.append(f"{name} {why.strip('*')}: **{'met' if ok else 'missed'}**")
        if parts:
            L.append(f"- {label}, asyncinfer ÷ BentoML workers=2 (target {goal:g}×): "
                     + "; ".join(parts) + ".")
    L.append("")
    L.append("The saturation point of each system is the client count (of "
             f"{res['profile']['sat_concurrency']}) at which it finished the most jobs within "
             "max_latency_ms; the ratio column divides asyncinfer's figure by BentoML "
             "workers=2's (for latency, BentoML's by asyncinfer's: above 1× asyncinfer is "
             "faster).\n")


def targets_section(res: dict[str, Any], L: list[str]) -> None:
    ts = targets(res)
    if not ts:
        return
    missed = [t for t in ts if t.ok is False]
    L.append("| target | measured | verdict | margin |")
    L.append("|---|---|---|---|")
    for t in ts:
        L.append(f"| {t.what} | {t.measured} | {_verdict(t)} | {t.margin} |")
    L.append("")
    met = sum(1 for t in ts if t.ok)
    L.append(f"{met} of {len(ts)} targets met, {len(missed)} missed (the margin says by how "
             "much); n/a: not measured in this run.\n")


def _lat_row(label: str, x: dict[str, Any] | None, extra: str = "") -> str:
    if x is None:
        return f"| {label} | – | – | – | – | – | – |{extra}"
    flag = " (overloaded)" if overloaded(x) else ""
    return (f"| {label} | {f0(x['throughput'])}{flag} | {f1(x['p50'])} | {f1(x['p99'])} | "
            f"{f1(x['batch'])} | {pct(x['ok'])} | {f2(x['cpu_ms_per_job'])} |{extra}")


def one_client(res: dict[str, Any], L: list[str]) -> None:
    m = mlp_figures(res)
    if not m["one"]:
        return
    L.append(f"One client sending its next job when the last is answered. The model alone: a "
             f"batch of one takes {f2(m['batch1_ms'])} ms (forward pass; "
             f"{f2(m['batch1_predict_ms'])} ms through `predict`, which builds the tensor from "
             "JSON floats), so the target p50 is "
             f"{f1((m['batch1_ms'] or 0) + 3)} ms.\n")
    L.append("| system | jobs/s | p50 ms | p99 ms | batch | ok | server CPU ms/job | "
             "predict p50 ms, in the worker | p50 − predict p50 |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for key in (f"{OURS}/jobs", f"{OURS}/jobs-wait", BENTO2, BENTO1):
        x = m["one"].get(key)
        if x is None:
            continue
        took = x.get("predict_ms")
        rest = None if took is None or x["p50"] is None else x["p50"] - took
        L.append(_lat_row(NAMES[key], x, f" {f2(took)} | {f2(rest)} |"))
    L.append("")
    L.append("The predict column is what asyncinfer's workers reported of these runs' batches "
             "(each batch's report on the model's completions stream): `predict` inside the "
             "running stack, where the model shares the cores with the gateway, the batcher, "
             "Redis and the generator and idles between jobs; compare it with the "
             f"{f2(m['batch1_predict_ms'])} ms through `predict` of the model alone in a hot "
             "loop. The last column subtracts one median from another: a rough share of the "
             "system, not a per-job measurement. BentoML reports no such figure.\n")


def saturation_table(res: dict[str, Any], L: list[str]) -> None:
    m = mlp_figures(res)
    if not m["sat"]:
        return
    L.append("Closed loop at each client count; **bold** is each system's saturation point "
             "(most goodput). Goodput counts jobs that succeeded within 250 ms of being sent; "
             "BentoML answers 503 to requests it expects to miss max_latency_ms, which count as "
             "failures.\n")
    L.append("| system | clients | jobs/s | goodput | p50 ms | p99 ms | ok | batch | CPU ms/job |"
             " jobs per CPU-s | cores used (server + generator) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in (OURS, f"{OURS}/jobs-wait", BENTO2, BENTO1):
        sat = m["sat"].get(key)
        if not sat:
            continue
        for c, x in sat["by_c"].items():
            if x is None:
                continue
            b = "**" if x is sat["point"] else ""
            cores = sum(v or 0 for v in x["cores"].values())
            L.append(f"| {NAMES[key]} | {c} | {f0(x['throughput'])} | {b}{f0(x['goodput'])}{b} "
                     f"| {f1(x['p50'])} | {f1(x['p99'])} | {pct(x['ok'])} | {f1(x['batch'])} | "
                     f"{f2(x['cpu_ms_per_job'])} | {f0(x['jobs_per_cpu_s'])} | "
                     f"{f2(cores)} + {f2(x['client_cores'])} |")
    L.append("")
    L.append("Where the CPU went at each saturation point (cores, by process):\n")
    for key in (OURS, BENTO2, BENTO1):
        sat = m["sat"].get(key)
        if sat:
            parts = sorted(((k, v) for k, v in sat["point"]["cores"].items() if (v or 0) >= 0.01),
                           key=lambda kv: -(kv[1] or 0))
            L.append(f"- {NAMES[key]}: " + ", ".join(f"{k} {f2(v)}" for k, v in parts))
    L.append("")


def loads_table(res: dict[str, Any], L: list[str]) -> None:
    m = mlp_figures(res)
    if not m["loads"]:
        return
    with_w1 = any(ld.get(BENTO1) for ld in m["loads"])
    L.append("Poisson arrivals at fractions of asyncinfer's saturation throughput "
             f"({f0(res['mlp']['ours_saturation'])} jobs/s with submit + long-poll), the same "
             "offered rates for each system. Per system: jobs/s served, p50 and p99 (ms), share "
             "of jobs that succeeded; then asyncinfer's latency as a ratio of BentoML "
             "workers=2's (below 1× asyncinfer is faster).\n")
    head = "| offered jobs/s | of saturation | asyncinfer | p50 | p99 | ok | batch | BentoML w=2 " \
           "| p50 | p99 | ok | batch |"
    sep = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if with_w1:
        head += " BentoML w=1 | p50 | p99 | ok |"
        sep += "---|---|---|---|"
    L += [head + " p50 ratio | p99 ratio |", sep + "---|---|"]

    def cells(x: dict[str, Any] | None, batch: bool = True) -> str:
        if x is None:
            return "– | – | – | –" + (" | –" if batch else "")
        flag = " (overloaded)" if overloaded(x) else ""
        return (f"{f0(x['throughput'])}{flag} | {f1(x['p50'])} | {f1(x['p99'])} | "
                f"{pct(x['ok'])}" + (f" | {f1(x['batch'])}" if batch else ""))

    for ld in m["loads"]:
        o, b = ld[OURS], ld[BENTO2]
        row = f"| {f0(ld['rate'])} | {pct(ld['fraction'])} | {cells(o)} | {cells(b)} |"
        if with_w1:
            row += f" {cells(ld[BENTO1], batch=False)} |"
        row += (f" {xr(ratio(o and o['p50'], b and b['p50']))} | "
                f"{xr(ratio(o and o['p99'], b and b['p99']))} |")
        L.append(row)
    L.append("")


def synthetic_section(res: dict[str, Any], L: list[str]) -> None:
    s = synthetic_figures(res)
    if not s:
        return
    L.append("## The synthetic model: a lone job, the fit, and shed mode\n")
    L.append(f"`workers.builtin.synthetic:SyntheticModel` sleeps a·n + b for a batch of n "
             f"(a = {1000 * s['truth']['a_s']:g} ms, b = {1000 * s['truth']['b_s']:g} ms: "
             f"{f0(s['batch1_ms'])} ms for one row), so its cost is known exactly; "
             f"max_batch_size={s['max_batch_size']}, max_latency_ms={s['max_latency_ms']}, one "
             "worker. Two copies run in one stack: `synthetic` (queue mode) and "
             "`synthetic-shed` (`on_overload = \"shed\"`).\n")
    L.append("| load | protocol | jobs/s | p50 ms | p99 ms | batch | queued ms | running ms | "
             "to client ms | predict p50 ms, in the worker |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    rows = [(f"open loop {f0(res['profile']['light_rate'])} jobs/s", k, v)
            for k, v in s["light_agg"].items()]
    rows += [("one client", k, v) for k, v in s["one_agg"].items()]
    for label, proto, x in rows:
        if x is None:
            continue
        bd = x["breakdown"] or {}
        L.append(f"| {label} | {proto} | {f0(x['throughput'])} | {f1(x['p50'])} | "
                 f"{f1(x['p99'])} | {f1(x['batch'])} | {f1(bd.get('queued'))} | "
                 f"{f1(bd.get('running'))} | {f1(bd.get('to_client'))} | "
                 f"{f2(x.get('predict_ms'))} |")
    L.append("")
    L.append("The legs are medians of the job records' stamps (millisecond resolution): "
             "submitted → started (batcher, hand-over to the worker), started → finished (the "
             "worker: fetch, predict, final write), finished → the client has the answer.\n")
    fit = s.get("fit") or {}
    L.append("Fitted latency model after the light-load run (`GET /v1/models/synthetic`: `a`, "
             "`b`), beside the truth:\n")
    L.append("| | fitted | truth | error |")
    L.append("|---|---|---|---|")
    for k, name in (("a_s", "a (per row)"), ("b_s", "b (per batch)")):
        got, truth = fit.get(k), s["truth"][k]
        err = abs(got - truth) / truth if got is not None else None
        L.append(f"| {name} | {f2(got and 1000 * got)} ms | {1000 * truth:g} ms | {pct(err)} |")
    L.append("")
    cap = s["shed"]["capacity_per_s"]
    L.append(f"Shed mode: capacity = {s['max_batch_size']} / (a·{s['max_batch_size']} + b) = "
             f"{f0(cap)} jobs/s on its one worker; Poisson arrivals at multiples of it. Served "
             "latency is over the jobs that succeeded; shed jobs fail at once with error "
             "`overloaded`. Shedding plans the model's queue: the legs before it (client to "
             "the job written) and after it (final write to the client) are the gateway's, "
             "which answers every offered job, shed or served, so the gateway's cores are "
             "shown beside them.\n")
    L.append("| offered | offered jobs/s | served jobs/s | goodput ≤ 200 ms | served p50 ms | "
             "served p99 ms | shed | refused (429) | batch | to the job written ms | "
             "to the client ms | gateway cores |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in s["shed_agg"]:
        st = x.get("statuses") or {}
        total = sum(st.values()) or 1
        shed = sum(v for k, v in st.items() if k == "failed:overloaded")
        refused = sum(v for k, v in st.items() if k == "http_429")
        L.append(f"| {x['factor']:g}× | {f0(x['rate'])} | {f0(x.get('throughput'))} | "
                 f"{f0(x.get('goodput'))} | {f1(x.get('p50'))} | {f1(x.get('p99'))} | "
                 f"{pct(shed / total)} | {pct(refused / total)} | {f1(x.get('batch'))} | "
                 f"{f1((x.get('breakdown') or {}).get('to_record'))} | "
                 f"{f1((x.get('breakdown') or {}).get('to_client'))} | "
                 f"{f2((x.get('cores') or {}).get('gateway'))} |")
    L.append("")


def device_section(device: str, res: dict[str, Any], L: list[str]) -> None:
    title = DEVICE_TITLE.get(device, device)
    m = mlp_figures(res)
    L.append(f"## {title}: headline\n")
    L.append(f"The MLP (256 → 2048 → 2048 → 2048 → 16) on {m['devices'] or device}: asyncinfer "
             f"with {m['workers'].get(OURS, '?')} worker(s), BentoML with workers=2 and "
             "workers=1, all with max_batch_size=64, max_latency_ms=250, one torch thread per "
             "worker, driven by the same generator in the same run.\n")
    headline(res, L)
    L.append(f"## {title}: targets\n")
    targets_section(res, L)
    L.append(f"## {title}: MLP, one client\n")
    one_client(res, L)
    L.append(f"## {title}: MLP, saturation\n")
    saturation_table(res, L)
    L.append(f"## {title}: MLP, open loop at fractions of asyncinfer's saturation\n")
    loads_table(res, L)
    if device == "cpu":
        synthetic_section(res, L)
    if res.get("http"):
        http_section(res, L)


def http_section(res: dict[str, Any], L: list[str]) -> None:
    from bench.analysis import agg

    h = res["http"]
    t, g, j = agg(h["trivial_submit"]), agg(h["gateway_submit"]), agg([h["trivial_jobs"]])
    if not (t and g and j):
        return
    L.append("## HTTP ceilings (CPU)\n")
    L.append(f"Closed loop, C={h['concurrency']}, the bare trivial server (FastAPI/uvicorn built "
             "like the gateway, doing nothing) against the gateway alone (Redis + gateway, "
             "nothing consuming):\n")
    tj = h["trivial_jobs"]
    us = 1e6 * (tj.get("client_cpu_s") or 0) / max(1, tj.get("requests") or 1)
    L.append("| | per second | generator cores |")
    L.append("|---|---|---|")
    L.append(f"| trivial server, submit | {f0(t['throughput'])} requests | "
             f"{f2(t['client_cores'])} |")
    L.append(f"| gateway alone, submit path ({pct(ratio(g['throughput'], t['throughput']))} of "
             f"the trivial server) | {f0(g['throughput'])} requests | {f2(g['client_cores'])} |")
    L.append(f"| trivial server, whole job (submit + long-poll): the ceiling of any figure "
             f"above, with this generator on the same cores | {f0(j['throughput'])} jobs | "
             f"{f2(j['client_cores'])} |")
    L.append("")
    L.append(f"The generator spent {f0(us)} µs of CPU per request in the last run.\n")


def machine_section(results: dict[str, dict[str, Any]], L: list[str]) -> None:
    L.append("## Machines and runs\n")
    L.append("| | " + " | ".join(DEVICE_TITLE.get(d, d) for d in results) + " |")
    L.append("|---|" + "---|" * len(results))
    rows: list[tuple[str, Any]] = [
        ("command", lambda r: f"`python -m bench.run --{r['mode']}"
         + (" --device cuda" if r["device"] == "cuda" else "")
         + (f" --scale {r['scale']:g}" if r.get("scale", 1) != 1 else "") + "`"),
        ("started", lambda r: r["started"]),
        ("took", lambda r: f"{r['elapsed_s'] / 60:.1f} min"),
        ("CPU", lambda r: f"{r['machine']['cpu_model']}, {r['machine']['nproc']} cores"),
        ("GPU", lambda r: r["machine"].get("gpu") or "–"),
        ("memory", lambda r: f"{r['machine']['mem_gib']} GiB"),
        ("kernel, Python", lambda r: f"{r['machine']['kernel']}, {r['machine']['python']}"),
        ("packages", lambda r: ", ".join(f"{k} {v}" for k, v in
                                         sorted(r["machine"]["versions"].items()))),
        ("load average before / after", lambda r: " / ".join(
            ", ".join(f"{x:.2f}" for x in r["machine"].get(k, []))
            for k in ("loadavg_before", "loadavg_after"))),
        ("raw JSON", lambda r: f"[docs/bench-data/{r['device']}/](bench-data/{r['device']}/)"),
    ]
    for label, fn in rows:
        L.append(f"| {label} | " + " | ".join(str(fn(r)) for r in results.values()) + " |")
    L.append("")


def markdown(results: dict[str, dict[str, Any]], docs: Path) -> str:
    L: list[str] = ["# Benchmarks\n"]
    for res in results.values():
        for note in filter(None, [res.get("note"), *res.get("notes", [])]):
            L.append(f"> **{DEVICE_TITLE.get(res['device'], res['device'])} run: {note}**\n")
    L.append("asyncinfer against BentoML's adaptive batching at equal CPU, the same model and "
             "batching limits, driven by one load generator (`asyncinfer.loadgen`) in one run "
             "on one machine; every ratio below compares figures of the same run. The headline "
             "is goodput within max_latency_ms and jobs per CPU-second at saturation, with the "
             "latency there, not throughput at any latency. Generated by `python -m bench.run` "
             "(bench/run.py); the raw JSON of every table is in "
             "[docs/bench-data/](bench-data/) (`summary.json` and one file per run, named in "
             "`runs/`).\n")
    if "cuda" not in results:
        L.append("No GPU run is published yet: `python -m bench.run --quick --device cuda` on a "
                 "machine with CUDA adds the GPU tables (it skips cleanly without one).\n")
    for device, res in results.items():
        device_section(device, res, L)
    eta_section(docs / "bench-data" / "cpu" / "eta.json", L)
    lone = docs / "bench-data" / "cpu" / "lone-batch.json"
    L.append(LONE_JOB.replace("{lone_batch}", lone_batch_table(
        json.loads(lone.read_text()) if lone.exists() else None)))
    L.append("## Plots\n")
    for device in results:
        suffix, where = ("", "") if device == "cpu" else (f"-{device}", " (GPU)")
        for name, what in (("bench-latency", "MLP latency against offered load"),
                           ("bench-saturation", "MLP goodput and CPU efficiency at saturation"),
                           ("bench-shed", "shed mode from 0.5× to 2× capacity")):
            if (docs / "img" / f"{name}{suffix}.png").exists():
                L.append(f"![{what}{where}](img/{name}{suffix}.png)\n")
    L.append(METHOD)
    machine_section(results, L)
    L.append(REPRODUCE)
    L.append(profile_section(docs))
    return "\n".join(L).rstrip() + "\n"


def eta_section(path: Path, L: list[str]) -> None:
    """ETA accuracy and deadline admission (`python -m bench.eta_accuracy`), when measured."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    m, adm = data["model"], data["admission"]
    L.append("## ETAs of queued jobs, and deadline admission\n")
    L.append(f"`python -m bench.eta_accuracy`: the synthetic model ({m['a_ms']:g} ms/row + "
             f"{m['b_ms']:g} ms, batches of {m['max_batch_size']}, one worker, capacity "
             f"{m['capacity_per_s']:g} jobs/s) under fixed-rate load. Each 202 carries the "
             "job's ETA at submit; the error is |predicted - actual finish|, relative to the "
             "job's actual wait (submit to finish). Raw: "
             "[bench-data/cpu/eta.json](bench-data/cpu/eta.json).\n")
    L.append("| offered load | jobs | median error / wait | p90 error / wait | median error |")
    L.append("|---|---|---|---|---|")
    for row in data["eta"]:
        L.append(f"| {pct(row['load'])} ({f0(row['offered_per_s'])}/s) | {row['jobs']} | "
                 f"{pct(row['median_error_relative_to_wait'])} | "
                 f"{pct(row['p90_error_relative_to_wait'])} | "
                 f"{f1(row['median_error_ms'])} ms |")
    L.append("")
    L.append(f"Behind a 2,000-job backlog (saturation), {adm['refused']} submits whose "
             f"`deadline_ms` could not be met were answered `429 deadline_unmeetable` in "
             f"{f1(adm['refusal_ms_p50'])} ms (p50; p99 {f1(adm['refusal_ms_p99'])} ms, client "
             f"side, HTTP included); of the {adm['accepted']} deadline jobs admitted, "
             f"{adm['accepted_late_by_more_than_a_plus_b']} finished later than their deadline "
             "plus the model's a + b.\n")


def write_report(docs: Path, results: dict[str, dict[str, Any]]) -> None:
    """docs/benchmarks.md and its plots from each device's summary (cpu first)."""
    from bench.plots import plots

    ordered: dict[str, dict[str, Any]] = {d: results[d] for d in ("cpu", "cuda") if d in results}
    img = docs / "img"
    img.mkdir(parents=True, exist_ok=True)
    plots(ordered, img)
    (docs / "benchmarks.md").write_text(markdown(ordered, docs))


def main(argv: list[str] | None = None) -> None:
    from bench.run import DATA

    args = argv if argv is not None else sys.argv[1:]
    data = Path(args[0]) if args else DATA
    results = load_published(data)
    if not results:
        raise SystemExit(f"no published summary under {data}; run python -m bench.run first")
    write_report(DOCS, results)
    print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
