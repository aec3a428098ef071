"""``scripts/bench compare``: TorchServe 0.12 and mqserve side by side, one table of ratios.

:func:`run_compare` starts both servers on this machine (:mod:`bench.servers`) with one
model store holding one archive, ``bench-noop.mar`` (the no-op handler of
:mod:`bench.lifecycle`, which answers each request with its body), and measures each
server with the same client. Every measure runs on the servers in ABBA order
(TorchServe, mqserve, mqserve, TorchServe; the next round starts with mqserve), so that
a machine that slows down or speeds up during the run weighs on both alike; each
figure is the median of a server's samples. The measures (:data:`MEASURES`):

* ``noop, 2 workers, C=32``: ``POST /predictions/<model>`` with ``{"input": [1, 2, 3]}``
  from ``wrk -t1 -c32 --latency`` for ``duration`` s: requests/s and p99.
* ``noop, 1 worker, C=1``: the same at one connection: p50.
* ``noop, batch_size 8, max_batch_delay 10 ms, 2 workers, C=32``: requests/s (the same
  archive, registered with ``batch_size=8&max_batch_delay=10``).
* ``describe, C=8``: ``GET /models/<model>`` on the management port from ``wrk -c8``.
* ``50 slow clients``: 50 connections each sending one byte of a never-ending request
  header per second to the inference port (resp. the management port), while
  :func:`bench.slow.probe_latency` times 5 ordinary predictions (resp. describes), each
  on a new connection: their median latency.
* ``sync register``: ``POST /models?url=bench-noop.mar&initial_workers=1&synchronous=true``;
  ``sync scale 1->4``: ``PUT /models/<model>?min_worker=4&synchronous=true``; and the
  ``idle worker RSS``: the median resident memory of those 4 workers right after the
  scale (TorchServe: its ``model_service_worker`` processes; mqserve: the workers its
  home's ``run/workers`` pid files record).

Before the first round each server gets one unmeasured warm-up pass (a register, a
scale up and down, ``duration`` s (at least 5 with TorchServe) of predictions and of
describes): a JVM's first calls run cold, and what is compared is each server serving,
not starting. The lifecycle measures come last in each round, after the loads.

Every answer of a timed call is checked (:meth:`bench.client.Endpoint.call`), each
model is warmed up with 5 checked predictions before its load, and load errors (non-2xx
answers, failed requests) are listed under the table: a figure with errors is suspect.
:class:`Goal` holds the targets of issue 11; "no worse than today" for the lifecycle
and memory measures is the ratio measured before that issue (0.2x, 0.2x, 0.25x), with
a margin for noise: at most 0.3x.

The table (:func:`format_table`, :func:`format_markdown`) is pure, and so are the
ordering (:func:`abba`) and the ratios (:func:`build_rows`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers as servers_mod
from bench.client import BenchError, expect_workers
from bench.lifecycle import NOOP_HANDLER, write_archive
from bench.load import LoadResult, Target, run_python, run_wrk, send_once
from bench.slow import latency_under_slow_clients
from bench.throughput import NOOP_PAYLOAD, check_noop

TORCHSERVE = "torchserve"
MQSERVE = "mqserve"
SERVERS = (TORCHSERVE, MQSERVE)
SERVER_TITLES = {TORCHSERVE: "TorchServe", MQSERVE: "mqserve"}
ARCHIVE_MODEL = "bench-noop"
WARMUP_REQUESTS = 5
SLOW_CLIENTS = 50
SLOW_PROBES = 5
SCALE_TO = 4
WORKERS_TIMEOUT_S = 60.0
#: The shortest load of the warm-up pass when TorchServe runs (else it runs ``duration`` s).
WARMUP_LOAD_S = 5.0

Progress = Callable[[str], None]
LoadClient = Callable[[Target, int, float], LoadResult]


# -- what is measured, and the goals --------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """A target: ``ratio>=``/``ratio<=`` bound mqserve/TorchServe; ``max`` bounds mqserve's
    own figure (in the measure's unit)."""

    kind: str
    value: float

    def text(self, unit: str, fancy: bool = False) -> str:
        ge, le, times = ("\u2265", "\u2264", "\u00d7") if fancy else (">=", "<=", "x")
        if self.kind == "ratio>=":
            return f"{ge} {self.value:.1f}{times}"
        if self.kind == "ratio<=":
            return f"{le} {self.value:.1f}{times}"
        return f"{le} {self.value:g} {unit}"

    def met(self, torchserve: float | None, mqserve: float | None) -> bool | None:
        """Whether the figures meet the goal; None when a figure it needs is missing."""
        if mqserve is None:
            return None
        if self.kind == "max":
            return mqserve <= self.value
        found = ratio(torchserve, mqserve)
        if found is None:
            return None
        return found >= self.value if self.kind == "ratio>=" else found <= self.value


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str
    goal: Goal


MEASURES = (
    Measure("noop2_rps", "noop, 2 workers, C=32: requests/s", "req/s", Goal("ratio>=", 2.0)),
    Measure("noop2_p99", "noop, 2 workers, C=32: p99", "ms", Goal("ratio<=", 0.5)),
    Measure("noop1_p50", "noop, 1 worker, C=1: p50", "ms", Goal("ratio<=", 0.8)),
    Measure(
        "batch_rps",
        "noop, batch_size 8, max_batch_delay 10 ms, 2 workers, C=32: requests/s",
        "req/s",
        Goal("ratio>=", 1.5),
    ),
    Measure(
        "describe_rps",
        "describe (GET /models/<model>), C=8: requests/s",
        "req/s",
        Goal("ratio>=", 1.0),
    ),
    Measure(
        "slow_predict_ms",
        f"{SLOW_CLIENTS} slow clients, inference port: a prediction",
        "ms",
        Goal("max", 20.0),
    ),
    Measure(
        "slow_describe_ms",
        f"{SLOW_CLIENTS} slow clients, management port: a describe",
        "ms",
        Goal("max", 20.0),
    ),
    Measure("register_s", "sync register, 1 worker", "s", Goal("ratio<=", 0.3)),
    Measure("scale_s", f"sync scale 1->{SCALE_TO}", "s", Goal("ratio<=", 0.3)),
    Measure("worker_rss_mib", "idle worker RSS", "MiB", Goal("ratio<=", 0.3)),
)
MEASURE_KEYS = tuple(m.key for m in MEASURES)


# -- pure helpers ---------------------------------------------------------------------------


def ratio(torchserve: float | None, mqserve: float | None) -> float | None:
    """mqserve / TorchServe, or None when either is missing or TorchServe's is 0."""
    if torchserve is None or mqserve is None or torchserve == 0:
        return None
    return mqserve / torchserve


def abba(names: Sequence[str], round_index: int) -> list[str]:
    """The order one measure visits the servers in round ``round_index`` (from 0):
    ``[a, b, b, a]``, with ``a`` and ``b`` swapped every other round; one server: once."""
    if len(names) == 1:
        return list(names)
    if len(names) != 2:
        raise ValueError(f"abba orders two servers, not {len(names)}")
    first, second = names if round_index % 2 == 0 else (names[1], names[0])
    return [first, second, second, first]


@dataclass
class Samples:
    """Every figure taken: measure key -> server -> values, in the order taken."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, server: str, value: float) -> None:
        if key not in MEASURE_KEYS:
            raise KeyError(key)
        self.values.setdefault(key, {}).setdefault(server, []).append(value)

    def of(self, key: str, server: str) -> list[float]:
        return self.values.get(key, {}).get(server, [])

    def median(self, key: str, server: str) -> float | None:
        found = self.of(key, server)
        return statistics.median(found) if found else None


def add_load(
    samples: Samples, server: str, keys: Mapping[str, str], result: LoadResult, what: str
) -> None:
    """Record a load run: ``keys`` maps a measure key to the :class:`LoadResult` field it
    takes (``requests_per_s``, ``p50_ms``, ``p99_ms``); errors become a note."""
    for key, attribute in keys.items():
        samples.add(key, server, float(getattr(result, attribute)))
    if result.errors:
        samples.notes.append(
            f"{SERVER_TITLES[server]}, {what}: {result.errors} errors in {result.requests} "
            f"requests ({result.non_2xx} non-2xx, {result.socket_errors} failed)"
        )


@dataclass(frozen=True)
class Row:
    measure: Measure
    torchserve: float | None
    mqserve: float | None

    @property
    def ratio(self) -> float | None:
        return ratio(self.torchserve, self.mqserve)

    @property
    def met(self) -> bool | None:
        return self.measure.goal.met(self.torchserve, self.mqserve)


def build_rows(samples: Samples) -> list[Row]:
    """One row per measure with each server's median (None where not measured)."""
    return [
        Row(m, samples.median(m.key, TORCHSERVE), samples.median(m.key, MQSERVE)) for m in MEASURES
    ]


def format_value(value: float | None, unit: str) -> str:
    """A figure in its unit's precision; ``-`` when missing."""
    if value is None:
        return "-"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.1f} {unit}"


def _met_text(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "no")


def _cells(row: Row, fancy: bool) -> list[str]:
    found = row.ratio
    times = "\u00d7" if fancy else "x"
    return [
        row.measure.label,
        format_value(row.torchserve, row.measure.unit),
        format_value(row.mqserve, row.measure.unit),
        "-" if found is None else f"{found:.2f}{times}",
        row.measure.goal.text(row.measure.unit, fancy),
        _met_text(row.met),
    ]


HEADER = ("measure", "TorchServe", "mqserve", "ratio", "target", "met?")


def format_table(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """The rows as a plain-text table (ratio = mqserve / TorchServe), then the notes."""
    cells = [_cells(row, fancy=False) for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            item.ljust(w) if i == 0 or i >= 4 else item.rjust(w)
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
    lines += ["", "| " + " | ".join(HEADER) + " |", "|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(_cells(row, fancy=True)) + " |" for row in rows]
    lines += ["", "Samples (in the order taken):", ""]
    for row in rows:
        for server in SERVERS:
            taken = samples.of(row.measure.key, server)
            if taken:
                text = ", ".join(format_value(v, row.measure.unit) for v in taken)
                lines.append(f"* {row.measure.label}, {SERVER_TITLES[server]}: {text}")
    if samples.notes:
        lines += ["", *(f"Note: {note}" for note in samples.notes)]
    return "\n".join(lines) + "\n"


def cpu_model(cpuinfo: str) -> str:
    """The ``model name`` of ``/proc/cpuinfo``'s text, or ``"?"``."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and value.strip():
            return value.strip()
    return "?"


def mem_total_gib(meminfo: str) -> float | None:
    """``MemTotal`` of ``/proc/meminfo``'s text, in GiB."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1024.0 * 1024.0)
    return None


def dist_version(venv: Path, project: str) -> str | None:
    """The version of ``project`` installed in ``venv`` (from its ``.dist-info`` name)."""
    for info in venv.glob(f"lib/python*/site-packages/{project.replace('-', '_')}-*.dist-info"):
        return info.name.removesuffix(".dist-info").split("-", 1)[1]
    return None


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparePlan:
    """What to run: which servers, how long each load runs, how many rounds, which client."""

    servers: Sequence[str]
    duration: float = 5.0
    rounds: int = 1
    client: str = "wrk"
    state_dir: Path = servers_mod.DEFAULT_STATE_DIR


@dataclass
class Report:
    rows: list[Row]
    samples: Samples
    machine: list[tuple[str, str]]


def _say_nothing(_line: str) -> None:
    return None


class _Runner:
    def __init__(
        self, plan: ComparePlan, running: Mapping[str, servers_mod.Server], say: Progress
    ) -> None:
        self.plan = plan
        self.servers = running
        self.say = say
        self.samples = Samples()
        self.client: LoadClient = run_wrk if plan.client == "wrk" else run_python

    # -- helpers

    def predict_target(self, server: str, model: str) -> Target:
        url = f"{self.servers[server].inference}/predictions/{model}"
        return Target(url, json.dumps(NOOP_PAYLOAD).encode(), {"Content-Type": "application/json"})

    def describe_target(self, server: str, model: str) -> Target:
        return Target(f"{self.servers[server].management}/models/{model}", b"", {}, "GET")

    def register(
        self, server: str, model: str, workers: int, batch: int = 1, delay: int = 100
    ) -> float:
        """Register ``model`` from the archive synchronously; the seconds it took."""
        params = {
            "url": f"{ARCHIVE_MODEL}.mar",
            "model_name": model,
            "initial_workers": workers,
            "batch_size": batch,
            "max_batch_delay": delay,
            "synchronous": "true",
        }
        endpoint = self.servers[server].endpoint
        started = time.perf_counter()
        endpoint.call("POST", "/models", params)
        seconds = time.perf_counter() - started
        expect_workers(endpoint, model, workers, f"a synchronous register with {workers}")
        return seconds

    def unregister(self, server: str, model: str) -> None:
        self.servers[server].endpoint.call("DELETE", f"/models/{model}")
        left = self.wait_workers(server, 0)
        if left:
            # Seen with TorchServe: a worker of an unregistered model that never exits.
            # The next measures count at least their own workers, so this is only noted.
            self.say(f"bench: {server} still runs worker(s) {left} after unregistering {model}")

    def wait_workers(self, server: str, count: int) -> list[int]:
        """Until the server runs ``count`` worker processes (for ``count`` > 0: at least
        that many, as a server may still be ending a worker of an earlier model); their
        pids. Waiting for 0 gives up after the timeout and returns what is left."""
        deadline = time.monotonic() + WORKERS_TIMEOUT_S
        while True:
            pids = self.servers[server].worker_pids()
            if (len(pids) >= count > 0) or len(pids) == count == 0:
                return pids
            if time.monotonic() > deadline:
                if count == 0:
                    return pids
                raise BenchError(f"{server} runs {len(pids)} worker processes, expected {count}")
            time.sleep(0.1)

    def warm_up(self, server: str, model: str) -> None:
        target = self.predict_target(server, model)
        for _ in range(WARMUP_REQUESTS):
            status, body = send_once(target)
            problem = f"status {status}" if status != 200 else check_noop(body)
            if problem:
                text = body[:300].decode(errors="replace")
                raise BenchError(f"warm-up POST {target.url}: {problem}; answered {status}: {text}")

    @contextlib.contextmanager
    def model(self, name: str, workers: int, batch: int = 1, delay: int = 100) -> Iterator[None]:
        """``name`` registered and warmed up on every server for the block, then removed."""
        done: list[str] = []
        try:
            for server in self.servers:
                self.register(server, name, workers, batch, delay)
                done.append(server)
                self.warm_up(server, name)
            yield
        finally:
            for server in done:
                with contextlib.suppress(BenchError):
                    self.unregister(server, name)

    def order(self, round_index: int) -> list[str]:
        return abba(list(self.servers), round_index)

    # -- the measures

    def lifecycle(self, round_index: int) -> None:
        model = "bench-life"
        for server in self.order(round_index):
            endpoint = self.servers[server].endpoint
            registered = True  # from the call on: a failed answer may leave it registered
            try:
                seconds = self.register(server, model, 1)
                self.samples.add("register_s", server, seconds)
                started = time.perf_counter()
                endpoint.call(
                    "PUT", f"/models/{model}", {"min_worker": SCALE_TO, "synchronous": "true"}
                )
                scaled = time.perf_counter() - started
                expect_workers(endpoint, model, SCALE_TO, f"a synchronous scale to {SCALE_TO}")
                self.samples.add("scale_s", server, scaled)
                rss = self.idle_rss(server)
                self.samples.add("worker_rss_mib", server, rss)
                self.say(
                    f"{server}: register {seconds:.3f} s, scale 1->{SCALE_TO} "
                    f"{scaled:.3f} s, idle worker RSS {rss:.1f} MiB"
                )
                self.unregister(server, model)
                registered = False
            finally:
                if registered:
                    with contextlib.suppress(BenchError):
                        endpoint.request("DELETE", f"/models/{model}")

    def idle_rss(self, server: str) -> float:
        """The median RSS (MiB) of the server's :data:`SCALE_TO` idle workers."""
        import psutil

        values: list[float] = []
        for pid in self.wait_workers(server, SCALE_TO):
            try:
                values.append(psutil.Process(pid).memory_info().rss / (1024.0 * 1024.0))
            except psutil.Error as exc:
                raise BenchError(f"cannot read the memory of {server} worker {pid}: {exc}") from exc
        return statistics.median(values)

    def load(
        self,
        round_index: int,
        model: str,
        concurrency: int,
        keys: Mapping[str, str],
        what: str,
        describe: bool = False,
    ) -> None:
        for server in self.order(round_index):
            target = (self.describe_target if describe else self.predict_target)(server, model)
            result = self.client(target, concurrency, self.plan.duration)
            add_load(self.samples, server, keys, result, what)
            self.say(
                f"{server}: {what}: {result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f}"
                f" ms, p99 {result.p99_ms:.2f} ms, {result.errors} errors"
            )

    def slow(self, round_index: int, model: str) -> None:
        for key, describe in (("slow_predict_ms", False), ("slow_describe_ms", True)):
            for server in self.order(round_index):
                target = (self.describe_target if describe else self.predict_target)(server, model)
                latency, closed = latency_under_slow_clients(target, SLOW_CLIENTS, SLOW_PROBES)
                self.samples.add(key, server, latency)
                if closed:
                    self.samples.notes.append(
                        f"{SERVER_TITLES[server]} closed {closed} slow connections ({key})"
                    )
                self.say(f"{server}: {key}: {latency:.2f} ms with {SLOW_CLIENTS} slow clients")

    def warm_up_servers(self) -> None:
        """One unmeasured pass per server: a register, a scale up and down, a load of
        predictions and of describes, so that no first measure pays for a cold JVM (whose
        JIT compiles the hot paths only after many calls) or cold caches."""
        self.say("bench: warm-up (not measured)")
        seconds = self.plan.duration
        if TORCHSERVE in self.servers:  # its JIT is what needs the time
            seconds = max(seconds, WARMUP_LOAD_S)
        with self.model("bench-warm", 1):
            for server in self.servers:
                endpoint = self.servers[server].endpoint
                endpoint.call("PUT", "/models/bench-warm", {"min_worker": 2, "synchronous": "true"})
                self.client(self.predict_target(server, "bench-warm"), 32, seconds)
                self.client(self.describe_target(server, "bench-warm"), 8, seconds)
                endpoint.call("PUT", "/models/bench-warm", {"min_worker": 1, "synchronous": "true"})

    def round(self, index: int) -> None:
        self.say(f"bench: round {index + 1} of {self.plan.rounds}")
        with self.model("bench-noop2", 2):
            self.load(
                index,
                "bench-noop2",
                32,
                {"noop2_rps": "requests_per_s", "noop2_p99": "p99_ms"},
                "noop, 2 workers, C=32",
            )
        with self.model("bench-noop1", 1):
            self.load(index, "bench-noop1", 1, {"noop1_p50": "p50_ms"}, "noop, 1 worker, C=1")
            self.load(
                index,
                "bench-noop1",
                8,
                {"describe_rps": "requests_per_s"},
                "describe, C=8",
                describe=True,
            )
            self.slow(index, "bench-noop1")
        with self.model("bench-batch", 2, batch=8, delay=10):
            self.load(
                index,
                "bench-batch",
                32,
                {"batch_rps": "requests_per_s"},
                "noop batch 8, 2 workers, C=32",
            )
        self.lifecycle(index)


def prepare_store(state_dir: Path) -> Path:
    """A fresh model store under ``state_dir`` holding ``bench-noop.mar``."""
    store = state_dir / "model-store"
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    write_archive(store, ARCHIVE_MODEL, NOOP_HANDLER)
    return store


def run_compare(plan: ComparePlan, progress: Progress | None = None) -> Report:
    """Start the plan's servers, measure everything ``plan.rounds`` times, stop them.

    Raises :class:`BenchError` on the first unexpected answer; the servers are stopped,
    with every process they started, whatever happens.
    """
    say = progress or _say_nothing
    for name in plan.servers:
        if name not in SERVERS:
            raise BenchError(f"unknown server {name!r} (known: {', '.join(SERVERS)})")
    if plan.rounds < 1:
        raise BenchError("rounds must be at least 1")
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    store = prepare_store(plan.state_dir)
    started_at = datetime.datetime.now(datetime.UTC)
    with contextlib.ExitStack() as stack:
        running = {
            name: stack.enter_context(servers_mod.running(name, plan.state_dir, store, say))
            for name in SERVERS
            if name in plan.servers
        }
        runner = _Runner(plan, running, say)
        runner.warm_up_servers()
        for index in range(plan.rounds):
            runner.round(index)
    machine = describe_machine(plan, started_at)
    return Report(build_rows(runner.samples), runner.samples, machine)


def _command_line(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
        return (done.stdout or done.stderr).strip()
    return ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def describe_machine(plan: ComparePlan, started_at: datetime.datetime) -> list[tuple[str, str]]:
    """``(what, value)`` lines: the machine, the versions measured and how the run ran."""
    memory = mem_total_gib(_read("/proc/meminfo"))
    repo = str(servers_mod.REPO)
    commit = _command_line(["git", "-C", repo, "rev-parse", "--short", "HEAD"]) or "?"
    if _command_line(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"]):
        commit += " with uncommitted changes"
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    lines = [
        ("date", started_at.strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{cpu_model(_read('/proc/cpuinfo'))}, {cores} cores ({usable} usable)"),
        ("memory", "?" if memory is None else f"{memory:.1f} GiB"),
        ("OS", f"{platform.system()} {platform.release()}, Python {platform.python_version()}"),
        ("mqserve", f"commit {commit}"),
    ]
    if TORCHSERVE in plan.servers:
        venv = plan.state_dir / "torchserve-venv"
        versions = ", ".join(
            f"{name} {dist_version(venv, name) or '?'}"
            for name in ("torchserve", "torch-model-archiver", "torch")
        )
        lines.append(("TorchServe", f"{versions}; {servers_mod.java_version()}"))
    client = "wrk -t1" if plan.client == "wrk" else "Python threads"
    if plan.client == "wrk":
        wrk = _command_line(["wrk", "-v"]).splitlines()
        client += f" ({wrk[0].split(' [')[0]})" if wrk else ""
    lines += [
        ("load client", f"{client}, {plan.duration:g} s per load, on the same machine"),
        ("runs", f"{plan.rounds} round(s), ABBA order; each figure the median of its samples"),
    ]
    return lines


def as_dict(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data."""
    return {
        "machine": dict(report.machine),
        "rows": [
            {
                "key": row.measure.key,
                "measure": row.measure.label,
                "unit": row.measure.unit,
                "torchserve": row.torchserve,
                "mqserve": row.mqserve,
                "ratio": row.ratio,
                "target": row.measure.goal.text(row.measure.unit),
                "met": row.met,
            }
            for row in report.rows
        ],
        "samples": report.samples.values,
        "notes": report.samples.notes,
    }
