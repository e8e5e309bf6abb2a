"""The generator's command-line arguments, shared by `asyncinfer bench` and
`python -m asyncinfer.loadgen` (which the benchmarks run in a process of its own).

    python -m asyncinfer.loadgen --url http://127.0.0.1:8000 --model mlp --bodies b.jsonl \
        --rate 200 --duration 10 --warmup 2 --slo-ms 250 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from asyncinfer.loadgen.drive import Bodies, Config, run_blocking
from asyncinfer.loadgen.protocols import PROTOCOLS

DEFAULT_INPUT = {"x": 1.0}  # the synthetic model's input


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The load's shape: open loop (--rate) or closed loop (--concurrency), protocol, timing."""
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: jobs arriving per second")
    load.add_argument("--concurrency", type=int, help="closed loop: clients, one job each")
    p.add_argument("--duration", type=float, required=True, metavar="S",
                   help="seconds of arrivals")
    p.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson",
                   help="open loop: Poisson or evenly spaced arrivals (default poisson)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="jobs",
                   help="jobs: submit + long-poll; jobs-wait: submit with Prefer: wait; "
                        "submit: the POST alone; sync: one POST answered with the result")
    p.add_argument("--input", default=None, metavar="FILE",
                   help="JSON input of every job, '-' for stdin (default: {\"x\": 1.0})")
    p.add_argument("--bodies", type=Path, default=None, metavar="FILE",
                   help="whole request bodies, one JSON a line, used in turn (instead of --input)")
    p.add_argument("--warmup", type=float, default=0.0, metavar="S",
                   help="seconds of arrivals left out of the figures")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="give up on a request after S seconds, and on the run S seconds after "
                        "the last arrival")
    p.add_argument("--wait", type=float, default=30.0, metavar="S", help="long-poll seconds")
    p.add_argument("--slo-ms", type=float, default=None, metavar="MS",
                   help="also report goodput: jobs/s that succeeded within MS")
    p.add_argument("--max-inflight", type=int, default=2048,
                   help="open loop: arrivals beyond this many jobs in flight are dropped")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="", help="name on the progress line")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _read(source: str) -> str:
    try:
        return sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {source}: {exc.strerror or exc}") from exc


def bodies_from(args: argparse.Namespace) -> Bodies:
    """Request body i: the --bodies lines in turn, else {"input": <--input>}. ValueError when
    neither can be read as JSON."""
    if args.bodies is not None:
        lines = [ln.strip().encode() for ln in _read(str(args.bodies)).splitlines()
                 if ln.strip()]
        if not lines:
            raise ValueError(f"no request bodies in {args.bodies}")
        return lambda i: lines[i % len(lines)]
    payload = DEFAULT_INPUT
    if args.input is not None:
        try:
            payload = json.loads(_read(args.input))
        except json.JSONDecodeError as exc:
            where = "stdin" if args.input == "-" else args.input
            raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    body = json.dumps({"input": payload}).encode()
    return lambda i: body


def config_from(args: argparse.Namespace, url: str, path: str) -> Config:
    """The run's Config; ValueError for a load that cannot run."""
    if (args.rate is not None and args.rate <= 0) or (
            args.concurrency is not None and args.concurrency <= 0) or args.duration <= 0:
        raise ValueError("--rate, --concurrency and --duration must be positive")
    key = os.environ.get("ASYNCINFER_API_KEY")
    return Config(
        url=url.rstrip("/"), path=path, protocol=args.protocol,
        mode="open" if args.rate is not None else "closed", arrivals=args.arrivals,
        rate=args.rate or 0.0, concurrency=args.concurrency or 0, duration_s=args.duration,
        warmup_s=min(args.warmup, args.duration / 2), drain_s=args.timeout,
        wait_s=min(args.wait, args.timeout), max_inflight=args.max_inflight,
        timeout_s=args.timeout + 5, slo_ms=args.slo_ms, seed=args.seed, label=args.label,
        headers={"Authorization": f"Bearer {key}"} if key else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncinfer.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="submit to /v1/models/MODEL/jobs")
    where.add_argument("--path", help="the POST path (a peer's /predict, say)")
    p.add_argument("--out", type=Path, help="write the summary JSON here (default: stdout)")
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        cfg = config_from(a, a.url, a.path or f"/v1/models/{a.model}/jobs")
        body = bodies_from(a)
    except ValueError as exc:
        p.error(str(exc))
    result = run_blocking(cfg, body, progress=None if a.quiet else sys.stderr)
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    else:
        print(text)
    return 0
