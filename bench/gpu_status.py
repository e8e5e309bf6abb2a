"""The record of a GPU check (bench/gpu_check.sh): docs/gpu.json, and docs/gpu.md made from it.

Standard library only: it runs with any python3, even one that lacks the project's packages, so
a check that stops early still writes what it found.

    python3 bench/gpu_status.py init docs/gpu.json
    python3 bench/gpu_status.py set docs/gpu.json KEY 'JSON value'
    python3 bench/gpu_status.py step docs/gpu.json NAME 'what happened'
    python3 bench/gpu_status.py tests docs/gpu.json junit.xml results.jsonl
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


def _bench_lines(bench: dict[str, Any]) -> list[str]:
    out = []
    limit = bench.get("model_limit") or {}
    if "error" in limit:
        out.append(f"- model alone: failed ({limit['error']})")
    elif limit:
        where = "cuda:0" if bench.get("device", "cuda") == "cuda" else "one CPU core"
        out.append(f"- model alone (torch MLP on {where}, no HTTP): best "
                   f"{limit.get('best_rows_per_s', 0):,.0f} rows/s at batch "
                   f"{limit.get('best_batch_size')}; one row "
                   f"{limit.get('batch1_forward_ms', 0):.2f} ms")
    served = bench.get("served") or {}
    if "error" in served:
        out.append(f"- served: failed ({served['error']})")
    elif served:
        sat, light = served.get("saturation", {}), served.get("light", {})
        out.append(f"- served by `asyncinfer up` (one mlp worker on {served['worker']['device']}"
                   f" {served['worker'].get('device_uuid') or ''}): "
                   f"{sat.get('jobs_per_s')} jobs/s at saturation ({sat.get('concurrency')} "
                   f"clients, submit + long-poll; p50 {sat.get('latency_ms', {}).get('p50', 0):.0f}"
                   f" ms); a lone job {light.get('latency_ms', {}).get('p50', 0):.1f} ms p50; "
                   f"fit a = {served.get('fit_a_ms_per_row')} ms/row, "
                   f"b = {served.get('fit_b_ms')} ms")
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
    elif cmd == "report":
        report(Path(args[0]), Path(args[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
