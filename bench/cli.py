"""``scripts/bench``: benchmarks of a TorchServe-compatible server, by subcommand.

``lifecycle`` times synchronous register, scale and unregister calls (see
:mod:`bench.lifecycle`); ``throughput`` measures predictions per second, latency and,
given the server's pid, its memory (see :mod:`bench.throughput`); ``compare`` starts
TorchServe 0.12 and mqserve side by side and prints each measure of both with the
ratio (see :mod:`bench.compare`); ``grpc`` starts mqserve and measures its gRPC
inference API beside HTTP: noop throughput and latency, streaming time to the first
chunk (see :mod:`bench.grpc_bench`). Results go to stdout as a table, or as JSON with
``--json``;
progress and hints go to stderr. Exit status: 0 on success, 1 when the server answered
something unexpected (the message says what), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import compare, grpc_bench, lifecycle, servers, throughput
from bench.client import BenchError, Endpoint, read_key
from bench.load import choose_client

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
DEFAULT_INFERENCE = "http://127.0.0.1:8080"
COMPARE_HINT = (
    "compare with TorchServe: scripts/bench lifecycle --management http://127.0.0.1:18081 "
    "--model-store <its store>"
)
THROUGHPUT_HINT = (
    "compare with TorchServe: scripts/bench throughput --inference http://127.0.0.1:18080 "
    "--management http://127.0.0.1:18081 --model-store <its store> "
    "--server-pid $(pgrep -f org.pytorch.serve.ModelServer) (the java process's pid), "
    "with the same options, on the same machine"
)
PID_HELP = (
    "pid at the top of the server's process tree, to report its memory: for mqserve the "
    "first token of $MQSERVE_HOME/run/mqserve.pid ($(head -n1 $MQSERVE_HOME/run/mqserve.pid)), "
    "for TorchServe the java process's pid ($(pgrep -f org.pytorch.serve.ModelServer))"
)


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` as ``[1, 8, 32]``; every item a positive integer."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,8,32")
    return values


def model_list(text: str) -> list[str]:
    """``"noop,iris"`` as ``["noop", "iris"]``; only the models :mod:`bench.throughput` knows."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in throughput.MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(throughput.MODELS)}")
    return names


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


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
    _add_throughput(commands)
    _add_compare(commands)
    _add_grpc(commands)
    return parser


def _add_grpc(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "grpc",
        help="mqserve's gRPC inference API beside HTTP: noop throughput, streaming first chunk",
        description="Start mqserve on free ports, register a no-op model (2 workers) and a "
        "streaming one (1 worker), and measure HTTP and gRPC in ABBA order: noop requests/s, "
        "p50 and p99 at --concurrency (HTTP from wrk -t1, gRPC from a Python grpc.aio "
        "client, so the gRPC figure is client-bound), and a streamed answer's time to its "
        "first chunk and to its end (median of --calls calls); stop mqserve and print "
        "measure | HTTP | gRPC.",
    )
    bench.add_argument(
        "--duration", type=positive_float, default=5.0, help="seconds per load run (5)"
    )
    bench.add_argument(
        "--concurrency", type=positive_int, default=8, help="calls in flight in the loads (8)"
    )
    bench.add_argument(
        "--calls", type=positive_int, default=10, help="streamed calls per protocol visit (10)"
    )
    bench.add_argument(
        "--pieces", type=positive_int, default=3, help="intermediate pieces per stream (3)"
    )
    bench.add_argument(
        "--piece-delay",
        type=non_negative_int,
        default=50,
        metavar="MS",
        help="the streaming handler's sleep after each piece, in ms (50)",
    )
    _add_side_by_side(
        bench,
        grpc_bench.DEFAULT_STATE_DIR,
        "where the model store, mqserve's home and its log live (.bench/grpc)",
        "HTTP load client (wrk when it is on PATH, else python)",
    )


def _add_side_by_side(
    parser: argparse.ArgumentParser, state_dir: Path, state_help: str, client_help: str
) -> None:
    """The options ``compare`` and ``grpc`` share: rounds, outputs, state, client."""
    parser.add_argument(
        "--rounds", type=positive_int, default=1, help="ABBA rounds; figures are medians (1)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also write the machine description and the table as markdown to FILE",
    )
    parser.add_argument("--state-dir", type=Path, default=state_dir, help=state_help)
    parser.add_argument("--client", choices=("wrk", "python"), help=client_help)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _add_compare(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    comp = commands.add_parser(
        "compare",
        help="TorchServe 0.12 and mqserve side by side: every measure, its ratio and target",
        description="Start TorchServe 0.12.0 (from a virtualenv created once under the state "
        "directory; Java 17 from the system) and mqserve on free ports with the same model "
        "archive, measure both in ABBA order (noop throughput and latency, batching, "
        "describe, slow clients, sync register and scale, idle worker RSS), stop both, and "
        "print each measure with the ratio mqserve/TorchServe and the target.",
    )
    comp.add_argument(
        "--only",
        choices=compare.SERVERS,
        help="measure one server only (no ratios; --only mqserve needs no TorchServe)",
    )
    comp.add_argument(
        "--duration", type=positive_float, default=5.0, help="seconds per load run (5)"
    )
    _add_side_by_side(
        comp,
        servers.DEFAULT_STATE_DIR,
        "where the TorchServe venv, the model store, homes and logs live (.bench)",
        "load client (wrk when it is on PATH, else python)",
    )


def _add_throughput(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tput = commands.add_parser(
        "throughput",
        help="predictions per second, p50/p99 latency and memory, per model/workers/batch",
        description="For each model x workers x batch size: register it synchronously, warm "
        "it up, load POST /predictions/<model> at each concurrency for --duration seconds "
        "(wrk -t1 when installed, else Python threads), record req/s, p50, p99 and errors "
        "(non-2xx answers and failed requests), report the server's memory with "
        "--server-pid, and unregister it.",
    )
    tput.add_argument(
        "--inference", default=DEFAULT_INFERENCE, help=f"inference API URL ({DEFAULT_INFERENCE})"
    )
    tput.add_argument(
        "--management",
        default=DEFAULT_MANAGEMENT,
        help=f"management API URL ({DEFAULT_MANAGEMENT})",
    )
    auth = tput.add_mutually_exclusive_group()
    auth.add_argument("--token", help="API key sent to both APIs")
    auth.add_argument(
        "--key-file", type=Path, help="key_file.json to read the management and inference keys from"
    )
    tput.add_argument(
        "--model-store",
        type=Path,
        required=True,
        help="the server's model store (bench-noop.mar and bench-iris.mar are written there "
        "and removed after)",
    )
    tput.add_argument(
        "--duration", type=positive_float, default=5.0, help="seconds per load point (5)"
    )
    tput.add_argument(
        "--concurrency", type=int_list, default=[1, 8, 32], help="connections (1,8,32)"
    )
    tput.add_argument("--workers", type=int_list, default=[1, 2], help="workers per model (1,2)")
    tput.add_argument(
        "--batch-sizes", type=int_list, default=[1, 8], help="batch_size values (1,8)"
    )
    tput.add_argument(
        "--max-batch-delay",
        type=non_negative_int,
        default=5,
        metavar="MS",
        help="max_batch_delay in ms (5)",
    )
    tput.add_argument(
        "--models", type=model_list, default=["noop", "iris"], help="models (noop,iris)"
    )
    tput.add_argument(
        "--iris-mar",
        type=Path,
        help=f"the iris archive (default {throughput.DEFAULT_IRIS_MAR}, built with "
        "examples/iris/train.py when missing)",
    )
    tput.add_argument("--server-pid", type=int, help=PID_HELP)
    tput.add_argument(
        "--client",
        choices=("wrk", "python"),
        help="load client (wrk when it is on PATH, else python)",
    )
    tput.add_argument("--json", action="store_true", help="print JSON only")


def run_lifecycle(args: argparse.Namespace) -> str:
    """Run the lifecycle benchmark for parsed ``args``; the report to print."""
    token = read_key(args.key_file) if args.key_file is not None else args.token
    endpoint = Endpoint(args.management, token)
    rows = lifecycle.measure_lifecycle(
        endpoint,
        args.model_store,
        runs=args.runs,
        slow_init=args.slow_init,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.json:
        return lifecycle.to_json(rows, endpoint.base_url, args.runs)
    return lifecycle.format_table(rows, endpoint.base_url, args.runs)


def run_throughput(args: argparse.Namespace) -> str:
    """Run the throughput benchmark for parsed ``args``; the report to print."""
    if args.key_file is not None:
        management_token: str | None = read_key(args.key_file, "management")
        inference_token: str | None = read_key(args.key_file, "inference")
    else:
        management_token = inference_token = args.token
    client = choose_client(args.client, shutil.which("wrk"))
    if client == "python" and args.client is None:
        print("bench: wrk is not on PATH; loading with Python threads", file=sys.stderr)
    plan = throughput.Plan(
        models=args.models,
        workers=args.workers,
        batch_sizes=args.batch_sizes,
        concurrency=args.concurrency,
        duration=args.duration,
        max_batch_delay=args.max_batch_delay,
        client=client,
        server_pid=args.server_pid,
    )
    inference = Endpoint(args.inference).base_url  # validates the URL
    results = throughput.measure_throughput(
        plan,
        inference,
        Endpoint(args.management, management_token),
        args.model_store,
        inference_token=inference_token,
        iris_mar=args.iris_mar,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    if args.json:
        return throughput.to_json(results, plan, inference)
    return throughput.format_report(results, plan, inference)


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds through the finally blocks that stop the servers.
    raise SystemExit(128 + signum)


def run_compare(args: argparse.Namespace) -> str:
    """Run the side-by-side comparison for parsed ``args``; the report to print."""
    client = choose_client(args.client, shutil.which("wrk"))
    if client == "python" and args.client is None:
        print("bench: wrk is not on PATH; loading with Python threads", file=sys.stderr)
    plan = compare.ComparePlan(
        servers=(args.only,) if args.only else compare.SERVERS,
        duration=args.duration,
        rounds=args.rounds,
        client=client,
        state_dir=args.state_dir.absolute(),
    )
    return _side_by_side(args, compare, lambda progress: compare.run_compare(plan, progress))


def run_grpc(args: argparse.Namespace) -> str:
    """Run the gRPC-beside-HTTP benchmark for parsed ``args``; the report to print."""
    client = choose_client(args.client, shutil.which("wrk"))
    if client == "python" and args.client is None:
        print("bench: wrk is not on PATH; loading HTTP with Python threads", file=sys.stderr)
    plan = grpc_bench.GrpcPlan(
        duration=args.duration,
        concurrency=args.concurrency,
        calls=args.calls,
        pieces=args.pieces,
        delay_ms=args.piece_delay,
        rounds=args.rounds,
        client=client,
        state_dir=args.state_dir.absolute(),
    )
    return _side_by_side(
        args, grpc_bench, lambda progress: grpc_bench.run_grpc_bench(plan, progress)
    )


def _side_by_side(args: argparse.Namespace, kind: Any, run: Callable[[Any], Any]) -> str:
    """What ``compare`` and ``grpc`` share once their plan is made: run it (SIGTERM
    unwinds through its cleanup), write ``--markdown``, and return ``--json`` or the
    machine and the table. ``kind`` is the module with the report's formatters."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        report = run(lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.markdown is not None:
        args.markdown.write_text(kind.format_markdown(report.rows, report.machine, report.samples))
        print(f"bench: wrote {args.markdown}", file=sys.stderr)
    if args.json:
        return json.dumps(kind.as_dict(report), indent=2)
    machine = "\n".join(f"{name}: {value}" for name, value in report.machine)
    table: str = kind.format_table(report.rows, report.samples.notes)
    return machine + "\n\n" + table


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "lifecycle" and args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        if args.command == "compare":
            print(run_compare(args))
            return 0
        if args.command == "grpc":
            print(run_grpc(args))
            return 0
        if args.command == "lifecycle":
            report, hint = run_lifecycle(args), COMPARE_HINT
        else:
            report = run_throughput(args)
            hint = THROUGHPUT_HINT if args.json else "\n" + THROUGHPUT_HINT
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(report)
    print(hint, file=sys.stderr if args.json else sys.stdout)
    return 0
