"""Benchmark the batching policies in the simulator over a grid of loads.

    python -m bench.cork_grid            # full grid, about a minute on two cores
    python -m bench.cork_grid --quick    # a smoke run: short traces, one seed, no docs update

Writes the raw and averaged results to bench/results/cork_grid.json, the plots to docs/img/, and
the tables into docs/batching.md between the `<!-- cork-grid -->` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

from batcher.policy import PolicyConfig
from batcher.simulate import POLICIES, CostModel, SimResult, make_trace, simulate
from bench.docs import DOCS, IMG, REPO, RESULTS

RESULT = RESULTS / "cork_grid.json"
DOC = DOCS / "batching.md"
MARK_START, MARK_END = "<!-- cork-grid:start -->", "<!-- cork-grid:end -->"

LOADS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5)
SHOWN = ("cork", "reference", "fixed", "none")  # the table and plots; reference-rr is extra
NAMES = {"cork": "CORK (ours)", "reference": "ReferenceCork", "reference-rr": "Reference, RR",
         "fixed": "FixedWindow 10 ms", "none": "NoBatching"}


@dataclass(frozen=True)
class Setup:
    """The simulated deployment: model cost, serving options, slots."""

    a_ms: float = 2.0
    b_ms: float = 20.0
    noise: float = 0.1
    max_batch_size: int = 32
    max_latency_ms: float = 200.0
    slots: int = 2

    @property
    def cost(self) -> CostModel:
        return CostModel(self.a_ms / 1000, self.b_ms / 1000, self.noise)

    @property
    def config(self) -> PolicyConfig:
        return PolicyConfig(self.max_batch_size, self.max_latency_ms, on_overload="shed")

    @property
    def capacity_rps(self) -> float:
        return self.cost.capacity_rps(self.max_batch_size, self.slots)


class Grid(TypedDict):
    """What a run of the grid produced (also the JSON file's shape)."""

    setup: dict[str, float]
    capacity_rps: float
    seconds: float
    seeds: int
    loads: list[float]
    mean: dict[str, dict[str, dict[str, float]]]  # policy -> load -> metric -> mean
    runs: list[dict[str, float | str]]


def _run(task: tuple[Setup, str, float, int, float]) -> tuple[str, float, int, SimResult]:
    setup, policy, load, seed, seconds = task
    trace = make_trace("poisson", load * setup.capacity_rps, seconds, seed)
    result = simulate(POLICIES[policy], trace, setup.cost, setup.config, setup.slots, seed)
    return policy, load, seed, result


def run_grid(setup: Setup, seconds: float, seeds: int, workers: int) -> Grid:
    """Every policy at every load and seed; returns raw runs and per-(policy, load) means."""
    policies = (*SHOWN, "reference-rr")
    tasks = [(setup, p, load, s, seconds) for p in policies for load in LOADS
             for s in range(1, seeds + 1)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        runs = list(pool.map(_run, tasks, chunksize=1))
    mean: dict[str, dict[str, dict[str, float]]] = {}
    for policy in policies:
        for load in LOADS:
            rs = [asdict(r) for p, lo, _, r in runs if p == policy and lo == load]
            mean.setdefault(policy, {})[str(load)] = {
                k: statistics.fmean(float(r[k]) for r in rs) for k in rs[0]
            }
    return Grid(
        setup=asdict(setup), capacity_rps=setup.capacity_rps, seconds=seconds, seeds=seeds,
        loads=list(LOADS), mean=mean,
        runs=[{"policy": p, "load": lo, "seed": s, **asdict(r)} for p, lo, s, r in runs],
    )


def _ratio(ours: float, ref: float) -> str:
    if ref == 0:
        return "=" if ours == 0 else "worse"
    return f"{ours / ref:.2f}"


def tables(grid: Grid) -> str:
    """The Markdown for docs/batching.md."""
    mean, setup, cap = grid["mean"], grid["setup"], grid["capacity_rps"]
    lines = [
        f"Setup: batch cost {setup['a_ms']:g} ms/row + {setup['b_ms']:g} ms "
        f"(±{100 * setup['noise']:.0f}% log-normal), {setup['slots']} worker slots, "
        f"max_batch_size {setup['max_batch_size']}, max_latency_ms {setup['max_latency_ms']:g}, "
        f"on_overload=shed; capacity {cap:.0f} req/s; Poisson arrivals, "
        f"{grid['seconds']:g} s per run, mean of {grid['seeds']} seeds.",
        "",
        "**Ours against the reference** (ratio ours / reference; throughput: higher is "
        "better, the rest: lower is better; `=` both zero):",
        "",
        "| load | req/s | throughput | × | p99 ms | × | late % | × | shed % | × |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for load in LOADS:
        o, r = mean["cork"][str(load)], mean["reference"][str(load)]
        lines.append(
            f"| {load:.0%} | {load * cap:.0f} | {o['throughput_rps']:.1f} vs "
            f"{r['throughput_rps']:.1f} | {_ratio(o['throughput_rps'], r['throughput_rps'])} | "
            f"{o['p99_ms']:.1f} vs {r['p99_ms']:.1f} | {_ratio(o['p99_ms'], r['p99_ms'])} | "
            f"{100 * o['late_share']:.2f} vs {100 * r['late_share']:.2f} | "
            f"{_ratio(o['late_share'], r['late_share'])} | {100 * o['shed_share']:.2f} vs "
            f"{100 * r['shed_share']:.2f} | {_ratio(o['shed_share'], r['shed_share'])} |"
        )
    lines += ["", "**All policies** (× = ratio to ReferenceCork):", "",
              "| load | policy | throughput | × | p50 ms | p99 ms | × | late % | shed % | "
              "mean batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for load in LOADS:
        ref = mean["reference"][str(load)]
        for policy in (*SHOWN, "reference-rr"):
            m = mean[policy][str(load)]
            lines.append(
                f"| {load:.0%} | {NAMES[policy]} | {m['throughput_rps']:.1f} | "
                f"{_ratio(m['throughput_rps'], ref['throughput_rps'])} | {m['p50_ms']:.1f} | "
                f"{m['p99_ms']:.1f} | {_ratio(m['p99_ms'], ref['p99_ms'])} | "
                f"{100 * m['late_share']:.2f} | {100 * m['shed_share']:.2f} | "
                f"{m['mean_batch_rows']:.1f} |"
            )
    return "\n".join(lines)


def plot(grid: Grid, path: Path) -> None:
    """Throughput, p99, late share and batch size against load, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, cap = grid["mean"], grid["capacity_rps"]
    panels = [("throughput_rps", "throughput (req/s)", False), ("p99_ms", "p99 latency (ms)", True),
              ("late_share", "share past max_latency_ms", False),
              ("mean_batch_rows", "mean batch (rows)", False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, label, log) in zip(axes.flat, panels, strict=True):
        for policy in SHOWN:
            ys = [mean[policy][str(load)][key] for load in LOADS]
            ax.plot([100 * load for load in LOADS], ys, marker="o", label=NAMES[policy])
        if key == "throughput_rps":
            ax.plot([100 * x for x in LOADS], [x * cap for x in LOADS], "k:", label="offered")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("offered load (% of capacity)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Batching policies in the simulator (higher throughput, lower the rest)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vs_reference(grid: Grid, path: Path) -> None:
    """Ours against the reference: p99 and late share side by side, and the ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = grid["mean"]
    xs = [100 * load for load in LOADS]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(14, 4.2))
    for policy in ("cork", "reference", "reference-rr"):
        left.plot(xs, [mean[policy][str(x)]["p99_ms"] for x in LOADS], marker="o",
                  label=NAMES[policy])
        mid.plot(xs, [100 * mean[policy][str(x)]["late_share"] for x in LOADS], marker="o",
                 label=NAMES[policy])
    left.set_ylabel("p99 latency (ms)")
    mid.set_ylabel("% of requests past max_latency_ms")
    ours, ref = mean["cork"], mean["reference"]
    for key, label in (("throughput_rps", "throughput"), ("p99_ms", "p99"),
                       ("shed_share", "shed share")):
        pairs = [(x, ours[str(load)][key] / ref[str(load)][key])
                 for x, load in zip(xs, LOADS, strict=True) if ref[str(load)][key] > 0]
        right.plot([x for x, _ in pairs], [r for _, r in pairs], marker="o", label=label)
    right.axhline(1.0, color="k", lw=0.8)
    right.set_ylabel("ours / ReferenceCork")
    for ax in (left, mid, right):
        ax.set_xlabel("offered load (% of capacity)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(markdown: str, doc: Path) -> None:
    text = doc.read_text()
    start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
    images = ("\n\n![ours against the reference](img/cork_vs_reference.png)\n\n"
              "![all policies](img/cork_grid.png)\n")
    doc.write_text(text[:start] + "\n" + markdown + images + text[end:])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cork_grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each trace")
    p.add_argument("--seeds", type=int, default=5, help="runs averaged per point")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="4 s traces, 1 seed, no docs update")
    args = p.parse_args(argv)
    seconds, seeds = (4.0, 1) if args.quick else (args.seconds, args.seeds)
    started = time.monotonic()
    grid = run_grid(Setup(), seconds, seeds, args.workers)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(grid, indent=1))
    markdown = tables(grid)
    print(markdown)
    if not args.quick:
        plot(grid, IMG / "cork_grid.png")
        plot_vs_reference(grid, IMG / "cork_vs_reference.png")
        update_doc(markdown, DOC)
    print(f"\n{len(grid['runs'])} runs in {time.monotonic() - started:.0f} s; "
          f"results in {RESULT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
