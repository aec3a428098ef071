"""``scripts/bench``: benchmarks of a TorchServe-compatible server, by subcommand.

``lifecycle`` times synchronous register, scale and unregister calls (see
:mod:`bench.lifecycle`). Results go to stdout as a table, or as JSON with ``--json``;
progress and hints go to stderr. Exit status: 0 on success, 1 when the server answered
something unexpected (the message says what), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.client import BenchError, Endpoint, read_key
from bench.lifecycle import format_table, measure_lifecycle, to_json

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
COMPARE_HINT = (
    "compare with TorchServe: scripts/bench lifecycle --management http://127.0.0.1:18081 "
    "--model-store <its store>"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="Benchmark a TorchServe-compatible server."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    life = commands.add_parser(
        "lifecycle",
        help="time synchronous register, scale 1->4->1 and unregister",
        description="Time synchronous register (1 worker), scale 1->4, scale 4->1 and "
        "unregister of a no-op model written into the server's model store.",
    )
    life.add_argument(
        "--management",
        default=DEFAULT_MANAGEMENT,
        help=f"management API URL ({DEFAULT_MANAGEMENT})",
    )
    auth = life.add_mutually_exclusive_group()
    auth.add_argument("--token", help="management API key")
    auth.add_argument("--key-file", type=Path, help="key_file.json to read the management key from")
    life.add_argument(
        "--model-store",
        type=Path,
        required=True,
        help="the server's model store (bench-noop.mar is written there and removed after)",
    )
    life.add_argument("--runs", type=int, default=5, help="repetitions (5)")
    life.add_argument(
        "--slow-init",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also time registering a model whose initialisation sleeps SECONDS",
    )
    life.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run_lifecycle(args: argparse.Namespace) -> str:
    """Run the lifecycle benchmark for parsed ``args``; the report to print."""
    token = read_key(args.key_file) if args.key_file is not None else args.token
    endpoint = Endpoint(args.management, token)
    rows = measure_lifecycle(
        endpoint,
        args.model_store,
        runs=args.runs,
        slow_init=args.slow_init,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.json:
        return to_json(rows, endpoint.base_url, args.runs)
    return format_table(rows, endpoint.base_url, args.runs)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.runs < 1:
        build_parser().error("--runs must be at least 1")
    try:
        report = run_lifecycle(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(report)
    print(COMPARE_HINT, file=sys.stderr if args.json else sys.stdout)
    return 0
