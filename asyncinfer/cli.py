"""The `asyncinfer` command line: start the stack on this machine, or talk to a running one.

    asyncinfer up
    asyncinfer secrets > .env          # fresh secrets for docker compose
    echo '{"x": 21}' | asyncinfer submit synthetic - --wait 10
    asyncinfer get JOB_ID --wait 30
    asyncinfer cancel JOB_ID
    asyncinfer models
    asyncinfer bench synthetic --rate 50 --duration 10      # open loop, Poisson arrivals
    asyncinfer bench synthetic --concurrency 1 --duration 10 --protocol jobs-wait

Results are JSON on stdout. A failure prints one line on stderr and exits 1 (an API or
connection error) or 2 (bad usage or unreadable input). The gateway URL is --url, else
$ASYNCINFER_URL, else http://127.0.0.1:8000; the API key is $ASYNCINFER_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from asyncinfer.client import ApiError, Client, SubmitOptions
from asyncinfer.loadgen.cli import add_arguments
from shared.logs import configure_logging
from shared.settings import Settings

USAGE_ERROR, API_ERROR = 2, 1


class UsageError(Exception):
    """Input the command cannot use (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the error is what the user needs to see.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _read_input(source: str) -> Any:
    """The job input: JSON from a file, or from stdin for '-'."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        where = "stdin" if source == "-" else source
        raise UsageError(f"{where} is not valid JSON: {exc}") from exc


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url)


def _submit(args: argparse.Namespace) -> int:
    payload = _read_input(args.file)
    options: SubmitOptions = {}
    if args.priority:
        options["priority"] = args.priority
    if args.ttl is not None:
        options["ttl_s"] = args.ttl
    if args.webhook:
        options["webhook"] = args.webhook
    if args.deadline_ms is not None:
        options["deadline_ms"] = args.deadline_ms
    if args.idempotency_key:
        options["idempotency_key"] = args.idempotency_key
    with _client(args) as client:
        _print_json(client.submit(args.model, payload, wait_s=args.wait, **options).public())
    return 0


def _get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.follow:  # JSON lines: the job at each status change, until the final one
            for event in client.events(args.job_id):
                sys.stdout.write(json.dumps(event.job.public()) + "\n")
                sys.stdout.flush()
            return 0
        _print_json(client.get(args.job_id, wait=args.wait).public())
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.cancel(args.job_id).public())
    return 0


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json([m.model_dump(by_alias=True) for m in client.models()])
    return 0


def _bench(args: argparse.Namespace) -> int:
    from asyncinfer.benchview import Sample, plot, summary_table
    from asyncinfer.client import DEFAULT_URL
    from asyncinfer.loadgen.cli import bodies_from, config_from
    from asyncinfer.loadgen.drive import run_blocking

    url = args.url or os.environ.get("ASYNCINFER_URL") or DEFAULT_URL
    try:
        cfg = config_from(args, url, f"/v1/models/{args.model}/jobs")
        body = bodies_from(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    cfg.label = cfg.label or f"bench {args.model}"
    samples: list[Sample] = []
    summary = run_blocking(cfg, body, progress=None if args.quiet else sys.stderr,
                           samples=samples)
    if not args.quiet:
        sys.stderr.write(summary_table(summary) + "\n")
    if args.plot:
        try:
            where = plot(samples, Path(args.plot), f"asyncinfer {cfg.label}")
        except ImportError as exc:
            raise UsageError(f"--plot needs matplotlib ({exc})") from exc
        summary["plot"] = str(where)
    _print_json(summary)
    return 0


def _up(args: argparse.Namespace) -> int:
    from asyncinfer.stack import up

    settings = Settings()
    configure_logging(settings.log_level)
    return up(settings, Path(args.state_dir).resolve(), with_flower=not args.no_flower)


def _secrets(args: argparse.Namespace) -> int:
    from asyncinfer.secrets import new_password, new_webhook_secret

    print(f"ASYNCINFER_WEBHOOK_SECRET={new_webhook_secret()}")
    print(f"FLOWER_PASSWORD={new_password()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asyncinfer", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start the whole stack on this machine (Ctrl-C stops it)")
    p.add_argument("--state-dir", default=".asyncinfer", help="Redis data and logs")
    p.add_argument("--no-flower", action="store_true", help="do not start Flower")
    p.set_defaults(func=_up)

    p = sub.add_parser("secrets", help="print fresh secrets as .env lines (for docker compose)")
    p.set_defaults(func=_secrets)

    remote = _Parser(add_help=False)
    remote.add_argument("--url", default=None,
                        help="gateway URL (default: $ASYNCINFER_URL or http://127.0.0.1:8000)")

    p = sub.add_parser("submit", parents=[remote], help="submit one job; prints the job")
    p.add_argument("model")
    p.add_argument("file", nargs="?", default="-", help="JSON input file, '-' for stdin")
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="hold the answer up to S seconds until the job is final")
    p.add_argument("--priority", choices=("high", "normal", "low"), default=None)
    p.add_argument("--ttl", type=float, default=None, metavar="S",
                   help="expire the job if still queued after S seconds")
    p.add_argument("--webhook", default=None, metavar="URL",
                   help="POST the final job here (signed)")
    p.add_argument("--deadline-ms", type=int, default=None, metavar="MS",
                   help="worth computing only if finished within MS ms (else 429 up front, or "
                        "expired unrun)")
    p.add_argument("--idempotency-key", default=None, metavar="KEY")
    p.set_defaults(func=_submit)

    p = sub.add_parser("get", parents=[remote], help="print a job")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="long-poll up to S seconds for the job to be final")
    p.add_argument("--follow", action="store_true",
                   help="print the job at each status change until it is final (SSE)")
    p.set_defaults(func=_get)

    p = sub.add_parser("cancel", parents=[remote], help="cancel a queued or running job")
    p.add_argument("job_id", metavar="ID")
    p.set_defaults(func=_cancel)

    p = sub.add_parser("models", parents=[remote], help="list the served models")
    p.set_defaults(func=_models)

    p = sub.add_parser("bench", parents=[remote],
                       help="load a model: open loop (--rate) or closed loop (--concurrency)")
    p.add_argument("model")
    add_arguments(p)
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="also draw each job's latency and the jobs done per second over the run "
                        "(needs matplotlib)")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except UsageError as exc:
        print(f"asyncinfer: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except ApiError as exc:
        print(f"asyncinfer: error: {exc}", file=sys.stderr)
        return API_ERROR
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
