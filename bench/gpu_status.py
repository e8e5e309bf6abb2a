"""The record of a GPU check (bench/gpu_check.sh): docs/gpu.json, and docs/gpu.md made from it.

Standard library only: it runs with any python3, even one that lacks the project's packages, so
a check that stops early still writes what it found.

    python3 bench/gpu_status.py init docs/gpu.json
    python3 bench/gpu_status.py set docs/gpu.json KEY 'JSON value'
    python3 bench/gpu_status.py step docs/gpu.json NAME 'what happened'
    python3 bench/gpu_status.py tests docs/gpu.json junit.xml results.jsonl
    python3 bench/gpu_status.py table docs/gpu.json docs/bench-data/cuda/summary.json
    python3 bench/gpu_status.py report docs/gpu.json docs/gpu.md
"""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"


def _load(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return {}


def _save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def init(path: Path) -> None:
    _save(path, {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "state": "running"})


def set_key(path: Path, key: str, raw: str) -> None:
    data = _load(path)
    try:
        data[key] = json.loads(raw)
    except ValueError:
        data[key] = raw
    data["updated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _save(path, data)


def step(path: Path, name: str, text: str) -> None:
    data = _load(path)
    data.setdefault("steps", {})[name] = text
    data["updated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _save(path, data)


def tests(path: Path, junit: Path, figures: Path) -> None:
    """Outcome of each GPU test (passed, failed, skipped with its reason) and their figures."""
    data = _load(path)
    outcomes = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    detail = (node.get("message") or node.text or "")[:400]
            outcomes.append({"test": case.get("name"), "outcome": outcome,
                             "seconds": round(float(case.get("time") or 0), 1),
                             "detail": detail})
    data["tests"] = outcomes
    data["test_figures"] = [json.loads(line) for line in figures.read_text().splitlines()
                            if line.strip()] if figures.exists() else []
    _save(path, data)


def _best(points: list[dict[str, Any]]) -> dict[str, Any]:
    return max(points, key=lambda x: x.get("goodput_per_s") or 0) if points else {}


def table(path: Path, summary: Path) -> None:
    """The headline figures of the GPU benchmark table (a bench.run summary) for the record;
    the whole table is docs/benchmarks.md's GPU section, made by `python -m bench.report`."""
    data = _load(path)
    try:
        res: dict[str, Any] = json.loads(summary.read_text())
    except (OSError, ValueError) as exc:
        data["benchmark"] = {"error": f"no summary at {summary}: {exc}"}
        _save(path, data)
        return
    limit, mlp = res.get("limit") or {}, res.get("mlp") or {}
    one = {name: {"jobs_per_s": round(runs[0]["throughput_per_s"], 1),
                  "p50_ms": round(runs[0]["latency_ms"]["p50"], 2)}
           for name, runs in (mlp.get("one_client") or {}).items() if runs}
    sat = {}
    for name, repeats in (mlp.get("saturation") or {}).items():
        best = _best([pt for rep in repeats for pt in rep])
        if best:
            sat[name] = {"clients": best.get("concurrency"),
                         "jobs_per_s": round(best["throughput_per_s"], 1),
                         "goodput_per_s": round(best.get("goodput_per_s") or 0, 1),
                         "p99_ms": round(best["latency_ms"]["p99"], 1),
                         "cpu_ms_per_job": round(best.get("server_cpu_ms_per_job") or 0, 2)}
    data["benchmark"] = {
        "summary": str(summary), "elapsed_s": round(res.get("elapsed_s") or 0),
        "model_batch1_ms": limit.get("batch1_forward_ms"),
        "model_best_rows_per_s": limit.get("best_rows_per_s"),
        "model_best_batch": limit.get("best_batch_size"),
        "one_client": one, "saturation": sat}
    _save(path, data)


def _bench_lines(bench: dict[str, Any]) -> list[str]:
    if "error" in bench:
        return [f"- benchmark table: {bench['error']}"]
    out = [f"- model alone (torch MLP, no HTTP): one row {bench.get('model_batch1_ms') or 0:.2f}"
           f" ms; best {bench.get('model_best_rows_per_s') or 0:,.0f} rows/s at batch "
           f"{bench.get('model_best_batch')}"]
    for name, f in (bench.get("one_client") or {}).items():
        out.append(f"- one client, {name}: {f['jobs_per_s']:.1f} jobs/s, p50 {f['p50_ms']:.2f} ms")
    for name, f in (bench.get("saturation") or {}).items():
        out.append(f"- saturation, {name}: {f['jobs_per_s']:.1f} jobs/s at {f['clients']} "
                   f"clients, goodput within 250 ms {f['goodput_per_s']:.1f}/s, p99 "
                   f"{f['p99_ms']:.1f} ms, {f['cpu_ms_per_job']:.2f} CPU-ms per job")
    out.append(f"- the whole table: `{bench.get('summary')}` (copied to docs/bench-data/cuda/ "
               "when the run completes), rendered in docs/benchmarks.md (GPU) by "
               "`python -m bench.report`")
    return out


def section(data: dict[str, Any]) -> str:
    lines = [f"Last check: started {data.get('started', '?')}, state **{data.get('state')}**"
             + (f" ({data['reason']})" if data.get("reason") else "") + "."]
    machine = data.get("machine") or {}
    if machine:
        lines += ["", f"- machine: {machine.get('gpus', '?')}; driver "
                  f"{machine.get('driver', '?')}; {machine.get('cores', '?')} cores"]
    py = data.get("python") or {}
    for cand in py.get("candidates", []):
        lines.append(f"- python `{cand.get('path')}`: {cand.get('found')}")
    if py.get("chosen"):
        lines.append(f"- used `{py['chosen']}`; packages: {data.get('packages', '?')}")
    if data.get("tests"):
        lines += ["", "| GPU test | outcome | s | detail |", "|---|---|---|---|"]
        for t in data["tests"]:
            detail = str(t.get("detail", "")).replace("|", "/").replace("\n", " ")
            lines.append(f"| `{t['test']}` | {t['outcome']} | {t['seconds']} | {detail} |")
    for fig in data.get("test_figures", []):
        lines.append(f"- `{fig.get('test')}`: " + ", ".join(
            f"{k} {v}" for k, v in fig.items() if k != "test"))
    bench = data.get("benchmark")
    if bench:
        lines += ["", *_bench_lines(bench)]
    steps = data.get("steps") or {}
    if steps:
        lines += ["", "Steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()) + "."]
    return "\n".join(lines)


def report(path: Path, md: Path) -> None:
    data = _load(path)
    text = md.read_text() if md.exists() else f"# GPU check\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    md.write_text(f"{head}{BEGIN}\n{section(data)}\n{END}{tail}")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, *args = argv
    if cmd == "init":
        init(Path(args[0]))
    elif cmd == "set":
        set_key(Path(args[0]), args[1], args[2])
    elif cmd == "step":
        step(Path(args[0]), args[1], args[2])
    elif cmd == "tests":
        tests(Path(args[0]), Path(args[1]), Path(args[2]))
    elif cmd == "table":
        table(Path(args[0]), Path(args[1]))
    elif cmd == "report":
        report(Path(args[0]), Path(args[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
