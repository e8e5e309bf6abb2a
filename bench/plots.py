"""The pictures of docs/benchmarks.md (docs/img/bench-*.png; a GPU run's carry `-cuda`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.analysis import (
    BENTO1,
    BENTO2,
    MLP_SLO_MS,
    OURS,
    mlp_figures,
    overloaded,
    synthetic_figures,
)

COLORS = {OURS: "#1f77b4", f"{OURS}/jobs-wait": "#17becf", BENTO2: "#d62728",
          BENTO1: "#ff7f0e"}
LABELS = {OURS: "asyncinfer", f"{OURS}/jobs-wait": "asyncinfer, Prefer: wait",
          BENTO2: "BentoML workers=2", BENTO1: "BentoML workers=1"}


def plots(results: dict[str, dict[str, Any]], img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    for device, res in results.items():
        suffix = "" if device == "cpu" else f"-{device}"
        if res.get("mlp"):
            _latency(res, img / f"bench-latency{suffix}.png")
            _saturation(res, img / f"bench-saturation{suffix}.png")
        if res.get("synthetic") and device == "cpu":
            _shed(res, img / "bench-shed.png")


def _latency(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    m = mlp_figures(res)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in (OURS, BENTO2, BENTO1):
        pts = [(ld["rate"], ld[name]) for ld in m["loads"] if ld.get(name)]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        for key, style in (("p50", "-"), ("p99", "--")):
            ax.plot(xs, [p[key] for _, p in pts], style, color=COLORS[name], marker="o",
                    label=f"{LABELS[name]} {key}")
        for x, p in pts:
            if overloaded(p) and p["p99"] is not None:
                ax.plot([x], [p["p99"]], "x", color="black", markersize=9)
    ax.axhline(MLP_SLO_MS, color="gray", ls=":", label=f"max_latency_ms = {MLP_SLO_MS:g}")
    if m["batch1_ms"]:
        ax.axhline(m["batch1_ms"], color="green", ls=":",
                   label=f"model batch of one ({m['batch1_ms']:.2f} ms)")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (jobs/s, Poisson)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title("MLP latency vs offered load (× = overloaded: <99% ok or <95% served)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _saturation(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    m = mlp_figures(res)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [k for k in (OURS, f"{OURS}/jobs-wait", BENTO2, BENTO1) if m["sat"].get(k)]
    for name in names:
        by_c = m["sat"][name]["by_c"]
        cs = [c for c, x in by_c.items() if x]
        ax1.plot(cs, [by_c[c]["goodput"] or 0 for c in cs], "-o", color=COLORS[name],
                 label=f"{LABELS[name]} goodput")
        ax1.plot(cs, [by_c[c]["throughput"] or 0 for c in cs], ":", color=COLORS[name],
                 label=f"{LABELS[name]} throughput")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("clients (closed loop)")
    ax1.set_ylabel("jobs/s")
    ax1.set_title(f"Goodput within {MLP_SLO_MS:g} ms (solid) and throughput (dotted)")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    vals = [(LABELS[n], m["sat"][n]["point"]["jobs_per_cpu_s"] or 0, COLORS[n]) for n in names]
    ax2.barh([v[0] for v in vals], [v[1] for v in vals], color=[v[2] for v in vals])
    for i, (_, v, _) in enumerate(vals):
        ax2.text(v * 1.02, i, f"{v:,.0f}", va="center", fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlim(0, max([v[1] for v in vals] + [1]) * 1.2)
    ax2.set_title("Jobs per CPU-second at the saturation point")
    ax2.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shed(res: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    s = synthetic_figures(res)
    if not s or not s["shed_agg"]:
        return
    xs = [x["factor"] for x in s["shed_agg"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, style in (("p50", "-o"), ("p99", "--o")):
        ax1.plot(xs, [x.get(key) or 0 for x in s["shed_agg"]], style, color=COLORS[OURS],
                 label=f"served {key}")
    ax1.axhline(s["max_latency_ms"], color="gray", ls=":",
                label=f"max_latency_ms = {s['max_latency_ms']}")
    ax1.set_xlabel("offered load (× capacity)")
    ax1.set_ylabel("latency of served jobs (ms)")
    ax1.set_title("Shed mode: served latency")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    cap = s["shed"]["capacity_per_s"]
    ax2.plot(xs, [x.get("goodput") or 0 for x in s["shed_agg"]], "-o", color=COLORS[OURS],
             label="goodput (≤ max_latency_ms)")
    ax2.plot(xs, [x.get("throughput") or 0 for x in s["shed_agg"]], ":o", color="gray",
             label="served")
    ax2.axhline(0.9 * s["shed_peak"], color="green", ls=":", label="90% of peak goodput")
    ax2.axhline(cap, color="black", ls="--", alpha=0.4, label=f"capacity ({cap:.0f}/s)")
    ax2.set_xlabel("offered load (× capacity)")
    ax2.set_ylabel("jobs/s")
    ax2.set_title("Shed mode: goodput")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
