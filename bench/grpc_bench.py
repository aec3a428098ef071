"""``scripts/bench grpc``: mqserve's gRPC inference API beside its HTTP one.

:func:`run_grpc_bench` starts mqserve on free ports (:func:`bench.servers.running`, as
``scripts/bench compare --only mqserve`` does; its gRPC inference port is read from the
``config.properties`` that function writes), waits until that port answers ``Ping``,
registers two models from one model store, and measures each protocol in ABBA order
(HTTP, gRPC, gRPC, HTTP; the next round starts with gRPC), so that a machine that
slows down during the run weighs on both alike. Each figure is the median of its
protocol's samples. The measures (:data:`MEASURES`):

* ``noop, 2 workers, C=<concurrency>``: the no-op handler of :mod:`bench.lifecycle`
  (``bench-noop.mar``, 2 workers) loaded for ``duration`` s at ``concurrency`` calls in
  flight: over HTTP ``POST /predictions/<model>`` with ``{"input": [1, 2, 3]}`` from the
  HTTP client of ``scripts/bench compare`` (``wrk -t1 --latency``, else Python
  threads); over gRPC ``Predictions`` with ``input {"body": <the same JSON>}`` from
  :func:`grpc_load`, ``grpc.aio`` in this process with one channel (one HTTP/2
  connection) per concurrent caller and a deadline on every call. Requests/s, p50, p99.
  The gRPC figure is bound by this Python client (one event loop on one core), where
  wrk's is not: the report says so.
* ``streaming, <pieces> pieces <delay> ms apart``: ``bench-stream.mar`` (1 worker),
  whose handler sends ``pieces`` intermediate results ``["tok"]`` with
  ``send_intermediate_predict_response``, sleeping ``delay`` ms after each, then
  returns ``["done"]``. Over HTTP one ``POST`` on a fresh connection read chunk by
  chunk (:func:`http_stream_once`), over gRPC one ``StreamPredictions`` call
  (:func:`grpc_stream_once`): the time to the first chunk (resp. message) and to the
  end of the answer, each the median of ``calls`` calls per visit. The handler's sleeps
  make the total about ``pieces x delay`` while the first chunk comes before the first
  sleep, so the two figures differ visibly when streaming works.

Every answer is checked: a noop answer must echo the request, a stream must consist of
exactly ``pieces`` pieces ``tok`` and the final ``done``; anything else raises
:class:`~bench.client.BenchError`. Load errors (non-2xx HTTP answers, failed calls) are
listed under the table. The server is stopped with every process it started whatever
happens (:func:`bench.servers.running`).

The percentile helper (:func:`bench.load.percentile`), the table (:func:`format_table`,
:func:`format_markdown`) and the JSON data (:func:`as_dict`) are pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio
from google.protobuf import empty_pb2

from bench import compare
from bench import servers as servers_mod
from bench.client import BenchError, expect_workers
from bench.lifecycle import NOOP_HANDLER, write_archive
from bench.load import LoadResult, Target, percentile, run_python, run_wrk, send_once
from bench.throughput import NOOP_PAYLOAD, check_noop
from control.grpc.protos import inference_pb2, inference_pb2_grpc

HTTP = "http"
GRPC = "grpc"
PROTOCOLS = (HTTP, GRPC)
PROTOCOL_TITLES = {HTTP: "HTTP", GRPC: "gRPC"}
NOOP_ARCHIVE = "bench-noop"
STREAM_ARCHIVE = "bench-stream"
NOOP_MODEL = "bench-grpc-noop"
STREAM_MODEL = "bench-grpc-stream"
NOOP_WORKERS = 2
WARMUP_CALLS = 5
#: The deadline of every gRPC call and the timeout of every HTTP read: a loaded server
#: may be slow, never this slow.
CALL_TIMEOUT_S = 30.0
GRPC_READY_TIMEOUT_S = 60.0
#: What the streaming handler sends: ``pieces`` times this, then :data:`STREAM_FINAL`.
STREAM_PIECE = b"tok"
STREAM_FINAL = b"done"
#: The default state directory: not ``scripts/bench compare``'s, whose server homes
#: :func:`bench.servers.running` deletes when it starts.
DEFAULT_STATE_DIR = servers_mod.DEFAULT_STATE_DIR / "grpc"
CLIENT_BOUND_NOTE = (
    "the gRPC load comes from a Python grpc.aio client in the benchmark's own process, "
    "one event loop: its figures are bound by that client, where wrk's (C, event-driven) "
    "are not; compare gRPC with HTTP from the same kind of client before drawing "
    "conclusions"
)

STREAM_HANDLER = '''\
"""Benchmark handler: {pieces} pieces ["tok"], each then {delay_ms} ms of sleep; then ["done"]."""

import time

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    for _ in range({pieces}):
        send_intermediate_predict_response(["tok"], context.request_ids, "ok", 200, context)
        time.sleep({delay_s})
    return ["done"]
'''

Progress = Callable[[str], None]
HttpLoad = Callable[[Target, int, float], LoadResult]


# -- what is measured ----------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str


def measures(concurrency: int, pieces: int, delay_ms: int) -> tuple[Measure, ...]:
    """The measures of a run with these settings, in table order."""
    noop = f"noop, {NOOP_WORKERS} workers, C={concurrency}"
    stream = f"streaming, {pieces} pieces {delay_ms} ms apart"
    return (
        Measure("noop_rps", f"{noop}: requests/s", "req/s"),
        Measure("noop_p50", f"{noop}: p50", "ms"),
        Measure("noop_p99", f"{noop}: p99", "ms"),
        Measure("stream_first_ms", f"{stream}: first chunk", "ms"),
        Measure("stream_total_ms", f"{stream}: whole answer", "ms"),
    )


@dataclass(frozen=True)
class GrpcPlan:
    """What to run: load seconds, concurrency, streaming calls and handler, ABBA rounds."""

    duration: float = 5.0
    concurrency: int = 8
    calls: int = 10
    pieces: int = 3
    delay_ms: int = 50
    rounds: int = 1
    client: str = "wrk"
    state_dir: Path = DEFAULT_STATE_DIR

    @property
    def measures(self) -> tuple[Measure, ...]:
        return measures(self.concurrency, self.pieces, self.delay_ms)


@dataclass
class Samples:
    """Every figure taken: measure key -> protocol -> values, in the order taken."""

    keys: tuple[str, ...]
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, protocol: str, value: float) -> None:
        if key not in self.keys or protocol not in PROTOCOLS:
            raise KeyError((key, protocol))
        self.values.setdefault(key, {}).setdefault(protocol, []).append(value)

    def of(self, key: str, protocol: str) -> list[float]:
        return self.values.get(key, {}).get(protocol, [])

    def median(self, key: str, protocol: str) -> float | None:
        found = self.of(key, protocol)
        return statistics.median(found) if found else None


@dataclass(frozen=True)
class Row:
    measure: Measure
    http: float | None
    grpc: float | None


def build_rows(measure_list: Sequence[Measure], samples: Samples) -> list[Row]:
    """One row per measure with each protocol's median (None where not measured)."""
    return [Row(m, samples.median(m.key, HTTP), samples.median(m.key, GRPC)) for m in measure_list]


# -- pure helpers --------------------------------------------------------------------------


def load_result(
    latencies_ms: Sequence[float], failed: int, seconds: float, non_ok: int = 0
) -> LoadResult:
    """A :class:`LoadResult` from answered calls' latencies (ms), calls that got no answer
    (``failed``) and answers that were errors (``non_ok``, counted among the latencies)."""
    elapsed = max(seconds, 1e-9)
    return LoadResult(
        requests=len(latencies_ms) + failed,
        seconds=elapsed,
        requests_per_s=len(latencies_ms) / elapsed,
        p50_ms=percentile(latencies_ms, 50),
        p99_ms=percentile(latencies_ms, 99),
        non_2xx=non_ok,
        socket_errors=failed,
    )


def check_stream(pieces: Sequence[bytes], expected: int, framed: bool = True) -> str | None:
    """What is wrong with a streamed answer, or None: ``expected`` times
    :data:`STREAM_PIECE`, then :data:`STREAM_FINAL`, and nothing else. ``framed``: each
    item must be one piece (gRPC messages); else only their concatenation is checked
    (HTTP reads, which TCP may split or join)."""
    want = [STREAM_PIECE] * expected + [STREAM_FINAL]
    if framed and list(pieces) != want:
        return f"expected the messages {want!r}, got {list(pieces)[:10]!r}"
    if not framed and b"".join(pieces) != b"".join(want):
        return f"expected the body {b''.join(want)!r}, got {b''.join(pieces)[:200]!r}"
    return None


HEADER = ("measure", "HTTP", "gRPC")


def _cells(row: Row) -> list[str]:
    unit = row.measure.unit
    return [
        row.measure.label,
        compare.format_value(row.http, unit),
        compare.format_value(row.grpc, unit),
    ]


def format_table(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """The rows as a plain-text table (measure | HTTP | gRPC), then the notes."""
    cells = [_cells(row) for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            item.ljust(w) if i == 0 else item.rjust(w)
            for i, (item, w) in enumerate(zip(items, widths, strict=True))
        ).rstrip()

    out = [line(HEADER), line(["-" * w for w in widths]), *(line(c) for c in cells)]
    out += [f"note: {note}" for note in notes]
    return "\n".join(out)


def format_markdown(
    rows: Sequence[Row], machine: Sequence[tuple[str, str]], samples: Samples
) -> str:
    """The table as markdown, after the machine and run description, then every sample."""
    lines = ["| what | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in machine]
    lines += ["", "| " + " | ".join(HEADER) + " |", "|---|---:|---:|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += ["", "Samples (in the order taken):", ""]
    for row in rows:
        for protocol in PROTOCOLS:
            taken = samples.of(row.measure.key, protocol)
            if taken:
                text = ", ".join(compare.format_value(v, row.measure.unit) for v in taken)
                lines.append(f"* {row.measure.label}, {PROTOCOL_TITLES[protocol]}: {text}")
    if samples.notes:
        lines += ["", *(f"Note: {note}" for note in samples.notes)]
    return "\n".join(lines) + "\n"


@dataclass
class Report:
    rows: list[Row]
    samples: Samples
    machine: list[tuple[str, str]]


def as_dict(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data (``http``/``grpc``: each protocol's median)."""
    return {
        "machine": dict(report.machine),
        "rows": [
            {
                "key": row.measure.key,
                "measure": row.measure.label,
                "unit": row.measure.unit,
                "http": row.http,
                "grpc": row.grpc,
            }
            for row in report.rows
        ],
        "samples": report.samples.values,
        "notes": report.samples.notes,
    }


def grpc_port(config_text: str) -> int:
    """``grpc_inference_port`` of a ``config.properties`` text; :class:`BenchError` if
    it has none."""
    for line in config_text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == "grpc_inference_port":
            with contextlib.suppress(ValueError):
                return int(value.strip())
    raise BenchError("the server's config.properties names no grpc_inference_port")


# -- the clients ---------------------------------------------------------------------------


def _channel_options() -> list[tuple[str, Any]]:
    # A local subchannel pool: channels to one address otherwise share one connection,
    # and C callers would multiplex over a single HTTP/2 stream set.
    return [("grpc.use_local_subchannel_pool", 1)]


def noop_request(model: str) -> inference_pb2.PredictionsRequest:
    """The gRPC twin of the HTTP noop request: its JSON body as the ``body`` part."""
    return inference_pb2.PredictionsRequest(
        model_name=model, input={"body": json.dumps(NOOP_PAYLOAD).encode()}
    )


async def _grpc_load(
    address: str, request: inference_pb2.PredictionsRequest, concurrency: int, duration: float
) -> LoadResult:
    channels = [
        grpc.aio.insecure_channel(address, options=_channel_options()) for _ in range(concurrency)
    ]
    latencies: list[float] = []
    failed = [0]
    try:
        await asyncio.gather(
            *(asyncio.wait_for(ch.channel_ready(), CALL_TIMEOUT_S) for ch in channels)
        )
        deadline = time.perf_counter() + duration

        async def caller(channel: grpc.aio.Channel) -> None:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)  # type: ignore[no-untyped-call]
            while (sent := time.perf_counter()) < deadline:
                try:
                    await stub.Predictions(request, timeout=CALL_TIMEOUT_S)
                except grpc.RpcError:
                    failed[0] += 1
                    continue
                latencies.append((time.perf_counter() - sent) * 1000.0)

        begin = time.perf_counter()
        await asyncio.gather(*(caller(ch) for ch in channels))
        elapsed = time.perf_counter() - begin
    except TimeoutError as exc:
        raise BenchError(f"gRPC {address}: no connection within {CALL_TIMEOUT_S:g} s") from exc
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return load_result(latencies, failed[0], elapsed)


def grpc_load(
    address: str, request: inference_pb2.PredictionsRequest, concurrency: int, duration: float
) -> LoadResult:
    """Closed-loop ``Predictions`` load on ``address`` (``host:port``): ``concurrency``
    callers, each on its own channel, each sending ``request`` again as soon as the
    previous answer came, for ``duration`` s; every call has a deadline of
    :data:`CALL_TIMEOUT_S`. A call that ends with an error status counts as failed."""
    if concurrency < 1:
        raise BenchError("concurrency must be at least 1")
    return asyncio.run(_grpc_load(address, request, concurrency, duration))


@dataclass(frozen=True)
class StreamTiming:
    """One streamed answer: ms to its first piece and to its end, and its pieces."""

    first_ms: float
    total_ms: float
    pieces: tuple[bytes, ...]


def http_stream_once(url: str, body: bytes, timeout: float = CALL_TIMEOUT_S) -> StreamTiming:
    """``POST url`` on a fresh connection, reading the chunked answer piece by piece:
    the time to the first body bytes (the first chunk) and to the end; ``pieces`` are
    the reads, which follow the chunks but may split one (TCP decides), so only their
    concatenation is checked. A status other than 200 or a broken connection raises
    :class:`BenchError`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"{url!r} is not an http://host:port URL")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    pieces: list[bytes] = []
    try:
        started = time.perf_counter()
        conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            text = response.read()[:300].decode(errors="replace")
            raise BenchError(f"POST {url} answered {response.status}: {text}")
        first = None
        # read1 returns at most what the current chunk holds, as soon as it arrives.
        while piece := response.read1(65536):
            if first is None:
                first = time.perf_counter()
            pieces.append(piece)
        ended = time.perf_counter()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"POST {url} failed: {exc}") from exc
    finally:
        conn.close()
    if first is None:
        raise BenchError(f"POST {url} answered an empty body")
    return StreamTiming((first - started) * 1000.0, (ended - started) * 1000.0, tuple(pieces))


def grpc_stream_once(
    stub: inference_pb2_grpc.InferenceAPIsServiceStub,
    request: inference_pb2.PredictionsRequest,
    timeout: float = CALL_TIMEOUT_S,
) -> StreamTiming:
    """One ``StreamPredictions`` call: the time to its first message and to its end.
    An error status raises :class:`BenchError`."""
    pieces: list[bytes] = []
    first = None
    started = time.perf_counter()
    try:
        for message in stub.StreamPredictions(request, timeout=timeout):
            if first is None:
                first = time.perf_counter()
            pieces.append(bytes(message.prediction))
    except grpc.RpcError as exc:
        raise BenchError(f"StreamPredictions failed: {exc.code()} {exc.details()}") from exc
    ended = time.perf_counter()
    if first is None:
        raise BenchError("StreamPredictions ended without a message")
    return StreamTiming((first - started) * 1000.0, (ended - started) * 1000.0, tuple(pieces))


def wait_grpc_ready(address: str, timeout: float = GRPC_READY_TIMEOUT_S) -> None:
    """Until ``address`` answers an inference ``Ping`` (whatever it says)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)  # type: ignore[no-untyped-call]
        while True:
            try:
                stub.Ping(empty_pb2.Empty(), timeout=2.0)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"the gRPC port {address} did not answer within {timeout:g} s: {exc.code()}"
                    ) from exc
            time.sleep(0.2)


# -- the run -------------------------------------------------------------------------------


def _say_nothing(_line: str) -> None:
    return None


class _Runner:
    def __init__(
        self, plan: GrpcPlan, server: servers_mod.Server, address: str, say: Progress
    ) -> None:
        self.plan = plan
        self.server = server
        self.address = address
        self.say = say
        self.samples = Samples(tuple(m.key for m in plan.measures))
        self.http_load: HttpLoad = run_wrk if plan.client == "wrk" else run_python
        self.labels = {m.key: m.label for m in plan.measures}

    def noop_target(self) -> Target:
        return Target(
            f"{self.server.inference}/predictions/{NOOP_MODEL}",
            json.dumps(NOOP_PAYLOAD).encode(),
            {"Content-Type": "application/json"},
        )

    def stream_request(self) -> inference_pb2.PredictionsRequest:
        return inference_pb2.PredictionsRequest(model_name=STREAM_MODEL, input={"body": b"{}"})

    @contextlib.contextmanager
    def model(self, name: str, archive: str, workers: int) -> Iterator[None]:
        """``name`` registered synchronously for the block, then unregistered."""
        endpoint = self.server.endpoint
        params = {
            "url": f"{archive}.mar",
            "model_name": name,
            "initial_workers": workers,
            "synchronous": "true",
        }
        endpoint.call("POST", "/models", params)
        try:
            expect_workers(endpoint, name, workers, f"a synchronous register with {workers}")
            yield
        finally:
            with contextlib.suppress(BenchError):
                endpoint.call("DELETE", f"/models/{name}")

    def warm_up_noop(self, stub: inference_pb2_grpc.InferenceAPIsServiceStub) -> None:
        target = self.noop_target()
        request = noop_request(NOOP_MODEL)
        for _ in range(WARMUP_CALLS):
            status, body = send_once(target)
            problem = f"status {status}" if status != 200 else check_noop(body)
            if problem:
                raise BenchError(f"warm-up POST {target.url}: {problem}: {body[:300]!r}")
            try:
                reply = stub.Predictions(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                raise BenchError(f"warm-up Predictions: {exc.code()} {exc.details()}") from exc
            problem = check_noop(bytes(reply.prediction))
            if problem:
                raise BenchError(f"warm-up Predictions: {problem}: {reply.prediction[:300]!r}")

    def note_errors(self, protocol: str, result: LoadResult) -> None:
        if result.errors:
            self.samples.notes.append(
                f"{PROTOCOL_TITLES[protocol]}, noop load: {result.errors} errors in "
                f"{result.requests} requests ({result.non_2xx} non-2xx, "
                f"{result.socket_errors} failed)"
            )

    def noop(self, round_index: int) -> None:
        for protocol in compare.abba(list(PROTOCOLS), round_index):
            if protocol == HTTP:
                result = self.http_load(
                    self.noop_target(), self.plan.concurrency, self.plan.duration
                )
            else:
                result = grpc_load(
                    self.address,
                    noop_request(NOOP_MODEL),
                    self.plan.concurrency,
                    self.plan.duration,
                )
            self.samples.add("noop_rps", protocol, result.requests_per_s)
            self.samples.add("noop_p50", protocol, result.p50_ms)
            self.samples.add("noop_p99", protocol, result.p99_ms)
            self.note_errors(protocol, result)
            self.say(
                f"{PROTOCOL_TITLES[protocol]}: noop C={self.plan.concurrency}: "
                f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                f"p99 {result.p99_ms:.2f} ms, {result.errors} errors"
            )

    def stream_once(
        self, protocol: str, stub: inference_pb2_grpc.InferenceAPIsServiceStub
    ) -> StreamTiming:
        if protocol == HTTP:
            url = f"{self.server.inference}/predictions/{STREAM_MODEL}"
            timing = http_stream_once(url, b"{}")
        else:
            timing = grpc_stream_once(stub, self.stream_request())
        problem = check_stream(timing.pieces, self.plan.pieces, framed=protocol == GRPC)
        if problem:
            raise BenchError(f"{PROTOCOL_TITLES[protocol]} stream: {problem}")
        return timing

    def streaming(
        self, round_index: int, stub: inference_pb2_grpc.InferenceAPIsServiceStub
    ) -> None:
        for protocol in compare.abba(list(PROTOCOLS), round_index):
            timings = [self.stream_once(protocol, stub) for _ in range(self.plan.calls)]
            first = statistics.median(t.first_ms for t in timings)
            total = statistics.median(t.total_ms for t in timings)
            self.samples.add("stream_first_ms", protocol, first)
            self.samples.add("stream_total_ms", protocol, total)
            self.say(
                f"{PROTOCOL_TITLES[protocol]}: streaming: first piece {first:.2f} ms, "
                f"whole answer {total:.2f} ms (median of {self.plan.calls})"
            )

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)  # type: ignore[no-untyped-call]
            with self.model(NOOP_MODEL, NOOP_ARCHIVE, NOOP_WORKERS):
                self.warm_up_noop(stub)
                for index in range(self.plan.rounds):
                    self.say(f"bench: noop, round {index + 1} of {self.plan.rounds}")
                    self.noop(index)
            with self.model(STREAM_MODEL, STREAM_ARCHIVE, 1):
                for protocol in PROTOCOLS:  # warm-up, checked, not measured
                    for _ in range(2):
                        self.stream_once(protocol, stub)
                for index in range(self.plan.rounds):
                    self.say(f"bench: streaming, round {index + 1} of {self.plan.rounds}")
                    self.streaming(index, stub)


def stream_handler(pieces: int, delay_ms: int) -> str:
    """The streaming handler's source for ``pieces`` pieces ``delay_ms`` ms apart."""
    return STREAM_HANDLER.format(pieces=pieces, delay_ms=delay_ms, delay_s=delay_ms / 1000.0)


def prepare_store(state_dir: Path, pieces: int, delay_ms: int) -> Path:
    """A fresh model store under ``state_dir`` with ``bench-noop.mar`` and
    ``bench-stream.mar``."""
    store = state_dir / "model-store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    write_archive(store, NOOP_ARCHIVE, NOOP_HANDLER)
    write_archive(store, STREAM_ARCHIVE, stream_handler(pieces, delay_ms))
    return store


def describe_machine(plan: GrpcPlan, started_at: datetime.datetime) -> list[tuple[str, str]]:
    """``scripts/bench compare``'s machine lines, with this run's clients and settings."""
    base = compare.describe_machine(
        compare.ComparePlan(
            servers=(compare.MQSERVE,),
            duration=plan.duration,
            rounds=plan.rounds,
            client=plan.client,
            state_dir=plan.state_dir,
        ),
        started_at,
    )
    lines = [(name, value) for name, value in base if name not in ("load client", "runs")]
    http_client = dict(base).get("load client", plan.client).split(",")[0]
    lines += [
        (
            "load clients",
            f"HTTP: {http_client}; gRPC: Python grpc.aio {grpc.__version__}, one channel per "
            f"caller; {plan.duration:g} s per load at C={plan.concurrency}, on the same machine",
        ),
        (
            "streaming",
            f"{plan.calls} calls per visit, each on a new connection (HTTP) or one channel (gRPC)",
        ),
        (
            "runs",
            f"{plan.rounds} round(s), ABBA order (HTTP, gRPC, gRPC, HTTP); each figure the "
            "median of its samples",
        ),
    ]
    return lines


def run_grpc_bench(plan: GrpcPlan, progress: Progress | None = None) -> Report:
    """Start mqserve, measure HTTP and gRPC ``plan.rounds`` times, stop it.

    Raises :class:`BenchError` on the first unexpected answer; the server is stopped,
    with every process it started, whatever happens.
    """
    say = progress or _say_nothing
    for name, value in (
        ("rounds", plan.rounds),
        ("concurrency", plan.concurrency),
        ("calls", plan.calls),
        ("pieces", plan.pieces),
    ):
        if value < 1:
            raise BenchError(f"{name} must be at least 1")
    if plan.delay_ms < 0:
        raise BenchError("the delay between pieces must not be negative")
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    store = prepare_store(plan.state_dir, plan.pieces, plan.delay_ms)
    started_at = datetime.datetime.now(datetime.UTC)
    with servers_mod.running(compare.MQSERVE, plan.state_dir, store, say) as server:
        port = grpc_port((server.home / "config.properties").read_text())
        address = f"127.0.0.1:{port}"
        wait_grpc_ready(address)
        say(f"bench: gRPC inference on {address}")
        runner = _Runner(plan, server, address, say)
        runner.run()
    runner.samples.notes.insert(0, CLIENT_BOUND_NOTE)
    machine = describe_machine(plan, started_at)
    return Report(build_rows(plan.measures, runner.samples), runner.samples, machine)
