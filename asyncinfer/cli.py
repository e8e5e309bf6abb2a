"""The `asyncinfer` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.logs import configure_logging
from shared.settings import Settings


def _up(args: argparse.Namespace) -> int:
    from asyncinfer.stack import up

    settings = Settings()
    configure_logging(settings.log_level)
    return up(settings, Path(args.state_dir).resolve(), with_flower=not args.no_flower)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start the whole stack on this machine (Ctrl-C stops it)")
    p.add_argument("--state-dir", default=".asyncinfer", help="Redis data and logs")
    p.add_argument("--no-flower", action="store_true", help="do not start Flower")
    p.set_defaults(func=_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
