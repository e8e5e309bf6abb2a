"""From a bench.run summary to the figures and verdicts the report shows: medians over repeats,
the saturation point of each system, and each issue-16 target as measured, with its margin."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

OURS, BENTO2, BENTO1 = "asyncinfer", "bentoml-w2", "bentoml-w1"
MLP_SLO_MS = 250.0
ONE_CLIENT_BUDGET_MS = 3.0  # a lone job may cost its model's batch-of-one time plus this


def worker_predict(reports: list[dict[str, str]]) -> dict[str, Any] | None:
    """What the workers reported of a run's batches (their completions stream): how long the
    model's `predict` took inside the running stack, p50 over the batches that ran to their
    end, and the mean batch those were."""
    # As the batcher reads them: a batch that ran to its end, with a predict time.
    done = [r for r in reports if r.get("outcome", "ok") == "ok"
            and float(r.get("predict_ms", 0)) > 0]
    if not done:
        return None
    return {"batches": len(done),
            "p50": statistics.median(float(r["predict_ms"]) for r in done),
            "mean_rows": statistics.fmean(int(r.get("rows", 1)) for r in done)}


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def agg(points: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The median over repeats of each figure the report shows."""
    if not points:
        return None

    def lat(key: str) -> float | None:
        return med([p["latency_ms"][key] for p in points])

    # Cores used by each kind of process ("redis-aof-rewrite 127.0.0.1:port" is a short fork).
    cores: list[dict[str, float]] = []
    for p in points:
        acc: dict[str, float] = {}
        for k, v in (p.get("server_cpu_s") or {}).items():
            acc[k.split(" ")[0]] = acc.get(k.split(" ")[0], 0.0) + v / (p["wall_s"] or 1)
        cores.append(acc)
    names = sorted({k for acc in cores for k in acc})
    statuses: dict[str, int] = {}
    for p in points:
        for k, v in p["status_counts"].items():
            statuses[k] = statuses.get(k, 0) + v
    cpu_ms = med([p.get("server_cpu_ms_per_job") for p in points])
    return {
        "n": len(points),
        "throughput": med([p["throughput_per_s"] for p in points]),
        "goodput": med([p.get("goodput_per_s") for p in points]),
        "offered": med([p["offered_per_s"] for p in points]),
        "concurrency": points[0].get("concurrency"),
        "p50": lat("p50"), "p90": lat("p90"), "p99": lat("p99"),
        "batch": med([p["batch_size"]["mean"] for p in points]),
        "ok": med([p["ok_fraction"] for p in points]),
        "cpu_ms_per_job": cpu_ms,
        "jobs_per_cpu_s": 1000 / cpu_ms if cpu_ms else None,
        "cores": {k: med([acc.get(k, 0.0) for acc in cores]) for k in names},
        "client_cores": med([p.get("client_cpu_fraction") for p in points]),
        "statuses": statuses,
        "breakdown": _breakdown([p.get("breakdown_ms") for p in points]),
        # The workers' own predict time (p50), where the system reports it (asyncinfer).
        "predict_ms": med([(p.get("worker_predict_ms") or {}).get("p50") for p in points]),
        "files": [p.get("file") for p in points],
    }


def _breakdown(items: list[dict[str, float] | None]) -> dict[str, float] | None:
    got = [b for b in items if b]
    return {k: statistics.median(b[k] for b in got) for k in got[0]} if got else None


def overloaded(a: dict[str, Any] | None) -> bool:
    """Fewer than 99% of the jobs succeeded, or under 95% of the offered rate was served."""
    if a is None or not a["offered"]:
        return False
    return bool((a["ok"] or 0) < 0.99 or (a["throughput"] or 0) < 0.95 * a["offered"])


def saturation(runs: list[list[dict[str, Any]]] | None) -> dict[str, Any] | None:
    """Each client count's medians, the saturation point (the count with the most goodput
    within max_latency_ms) and the peak throughput at any count."""
    if not runs:
        return None
    by_c: dict[int, list[dict[str, Any]]] = {}
    for rep in runs:
        for p in rep:
            by_c.setdefault(int(p["concurrency"]), []).append(p)
    counts = {c: agg(pts) for c, pts in sorted(by_c.items())}
    point = max(counts.values(), key=lambda x: (x or {}).get("goodput") or 0.0)
    peak = max((x or {}).get("throughput") or 0.0 for x in counts.values())
    return {"by_c": counts, "point": point, "peak_throughput": peak}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class Target:
    what: str
    measured: str
    goal: str
    ok: bool | None  # None: not measured in this run
    margin: str = ""  # by how much it is missed (or met)


def _f(v: float | None, d: int = 1) -> str:
    return "–" if v is None else f"{v:,.{d}f}"


def within(value: float | None, limit: float, unit: str = " ms") -> tuple[bool | None, str]:
    """value ≤ limit, and the margin in words."""
    if value is None:
        return None, ""
    gap = value - limit
    return gap <= 0, (f"{_f(-gap)}{unit} to spare" if gap <= 0 else f"**{_f(gap)}{unit} over**")


def at_least(r: float | None, goal: float) -> tuple[bool | None, str]:
    """A ratio that must reach `goal`, and the margin in words."""
    if r is None:
        return None, ""
    if r >= goal:
        return True, f"{r:.2f}× (goal {goal:g}×)"
    return False, f"**{r:.2f}×, {100 * (1 - r / goal):.0f}% short of {goal:g}×**"


def mlp_figures(res: dict[str, Any]) -> dict[str, Any]:
    """The MLP part of a summary, aggregated."""
    mlp = res.get("mlp") or {}
    one = {k: agg(v) for k, v in (mlp.get("one_client") or {}).items()}
    sat = {k: saturation(v) for k, v in (mlp.get("saturation") or {}).items()}
    loads = [{"fraction": pt["fraction"], "rate": pt["rate"],
              **{k: agg(pt.get(k)) for k in (OURS, BENTO2, BENTO1)}}
             for pt in mlp.get("loads") or []]
    limit = res.get("limit") or {}
    return {"one": one, "sat": sat, "loads": loads, "limit": limit,
            "batch1_ms": limit.get("batch1_forward_ms"),
            "batch1_predict_ms": limit.get("batch1_predict_ms"),
            "systems": mlp.get("systems") or [], "workers": mlp.get("workers") or {},
            "devices": mlp.get("devices")}


def synthetic_figures(res: dict[str, Any]) -> dict[str, Any] | None:
    syn = res.get("synthetic")
    if not syn:
        return None
    light = {k: agg([v]) for k, v in (syn.get("light") or {}).items()}
    one = {k: agg(v) for k, v in (syn.get("one_client") or {}).items()}
    shed = [{"factor": ld["factor"], "rate": ld["rate"], **(agg(ld["runs"]) or {})}
            for ld in syn["shed"]["loads"]]
    peak = max((x.get("goodput") or 0.0 for x in shed), default=0.0)
    return {**syn, "light_agg": light, "one_agg": one, "shed_agg": shed, "shed_peak": peak}


def targets(res: dict[str, Any]) -> list[Target]:
    """Every target of issue 16 that this run measured, with its verdict and margin."""
    m, s = mlp_figures(res), synthetic_figures(res)
    out: list[Target] = []
    b1 = m["batch1_ms"]
    for proto in ("jobs", "jobs-wait"):
        x = m["one"].get(f"{OURS}/{proto}")
        if x and b1 is not None:
            ok, why = within(x["p50"], b1 + ONE_CLIENT_BUDGET_MS)
            inside = ("" if x.get("predict_ms") is None else
                      f" (predict in the worker: {_f(x['predict_ms'], 2)} ms)")
            out.append(Target(f"MLP, one client ({proto}): p50 ≤ batch of one + 3 ms",
                              f"{_f(x['p50'])} ms vs {_f(b1, 2)} + 3 ms{inside}", "≤ +3 ms",
                              ok, why))
    if s:
        for proto, x in s["one_agg"].items():
            ok, why = within(x and x["p50"], s["batch1_ms"] + ONE_CLIENT_BUDGET_MS)
            out.append(Target(f"synthetic, one client ({proto}): p50 ≤ 12 + 3 ms",
                              f"{_f(x and x['p50'])} ms", "≤ 15 ms", ok, why))
    b2 = m["one"].get(BENTO2)
    for proto in ("jobs", "jobs-wait"):
        x = m["one"].get(f"{OURS}/{proto}")
        if x and b2:
            ok, why = at_least(ratio(x["throughput"], b2["throughput"]), 1.5)
            out.append(Target(f"MLP, one client ({proto}): jobs/s ≥ 1.5× BentoML workers=2",
                              f"{_f(x['throughput'])} vs {_f(b2['throughput'])} jobs/s", "1.5×",
                              ok, why))
    for ld in m["loads"]:
        o, b = ld[OURS], ld[BENTO2]
        if ld["fraction"] not in (0.25, 0.5, 0.75) or o is None:
            continue
        pct = f"{ld['fraction']:.0%} of saturation ({_f(ld['rate'], 0)} jobs/s)"
        if b:
            for key in ("p50", "p99"):
                ok, why = within(o[key], b[key]) if b[key] is not None else (None, "")
                out.append(Target(f"MLP, open loop at {pct}: {key} ≤ BentoML workers=2's",
                                  f"{_f(o[key])} vs {_f(b[key])} ms", "≤ BentoML", ok, why))
        ok, why = within(o["p99"], MLP_SLO_MS)
        out.append(Target(f"MLP, open loop at {pct}: p99 ≤ max_latency_ms (queue mode)",
                          f"{_f(o['p99'])} ms", "≤ 250 ms", ok, why))
    if s and s["light_agg"].get("jobs"):
        x = s["light_agg"]["jobs"]
        ok, why = within(x and x["p50"], s["batch1_ms"] + ONE_CLIENT_BUDGET_MS)
        out.append(Target("synthetic, open loop at 25 jobs/s: p50 ≤ 12 + 3 ms",
                          f"{_f(x and x['p50'])} ms", "≤ 15 ms", ok, why))
    so, sb = m["sat"].get(OURS), m["sat"].get(BENTO2)
    if so and sb:
        po, pb = so["point"], sb["point"]
        ok, why = at_least(ratio(po["goodput"], pb["goodput"]), 3.0)
        out.append(Target("MLP, saturation: goodput within 250 ms ≥ 3× BentoML workers=2",
                          f"{_f(po['goodput'], 0)} vs {_f(pb['goodput'], 0)} jobs/s", "3×", ok,
                          why))
        ok, why = at_least(ratio(po["jobs_per_cpu_s"], pb["jobs_per_cpu_s"]), 2.0)
        out.append(Target("MLP, saturation: jobs per CPU-second ≥ 2× BentoML workers=2",
                          f"{_f(po['jobs_per_cpu_s'], 0)} vs {_f(pb['jobs_per_cpu_s'], 0)}",
                          "2×", ok, why))
    if s:
        for x in s["shed_agg"]:
            ok, why = within(x.get("p99"), s["max_latency_ms"])
            out.append(Target(f"shed mode at {x['factor']:g}× capacity: served p99 ≤ 200 ms",
                              f"{_f(x.get('p99'))} ms", "≤ 200 ms", ok, why))
        two = next((x for x in s["shed_agg"] if x["factor"] == 2.0), None)
        if two and s["shed_peak"]:
            r = (two.get("goodput") or 0) / s["shed_peak"]
            ok = r >= 0.9
            out.append(Target("shed mode at 2× capacity: goodput ≥ 90% of the peak",
                              f"{_f(two.get('goodput'), 0)} vs peak {_f(s['shed_peak'], 0)} "
                              "jobs/s", "≥ 90%", ok,
                              f"{r:.0%}" if ok else f"**{r:.0%}, {100 * (0.9 - r):.0f} points "
                              "short**"))
        fit, truth = s.get("fit") or {}, s["truth"]
        for k, name in (("a_s", "a"), ("b_s", "b")):
            got = fit.get(k)
            err = abs(got - truth[k]) / truth[k] if got is not None else None
            out.append(Target(f"synthetic fit after light load: {name} within 25% of the truth",
                              f"{_f(got and 1000 * got, 2)} ms vs {1000 * truth[k]:g} ms",
                              "±25%", None if err is None else err <= 0.25,
                              "" if err is None else (f"off by {err:.0%}" if err <= 0.25 else
                                                      f"**off by {err:.0%}**")))
    return out
