"""Prediction throughput and latency of a TorchServe-compatible server, and its memory.

For each model x workers x batch size, :func:`measure_throughput` registers the model
synchronously through the management API (``POST /models?url=...&model_name=...&
initial_workers=...&batch_size=...&max_batch_delay=...&synchronous=true``), checks that
its description lists that many workers, sends a few warm-up predictions (each must
answer 200 with a sensible body), then for each concurrency keeps that many
connections busy with ``POST /predictions/<model>`` for ``duration`` seconds and
records requests per second, p50 and p99 latency and the errors. With a server pid it
then records the memory of the server's process tree (see :mod:`bench.memory`), and
the memory of one idle worker measured after the warm-up, before the load. Finally the
model is unregistered again, also when something failed.

Models:

* ``noop``: ``bench-noop.mar``, written into the model store (the handler of
  :mod:`bench.lifecycle`: one answer per request, its body), sent ``{"input": [1, 2, 3]}``
  as JSON; it must answer the same JSON.
* ``iris``: the example classifier (``examples/iris``), copied into the store as
  ``bench-iris.mar`` and sent ``[5.1, 3.5, 1.4, 0.2]``; it must answer "setosa" first.

The same requests work on TorchServe 0.12, so both servers can be measured alike.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import memory
from bench.client import BenchError, Endpoint, expect_workers
from bench.lifecycle import NOOP_HANDLER, write_archive
from bench.load import LoadResult, Target, run_python, run_wrk, send_once, wrk_duration

MODELS = ("noop", "iris")
NOOP_PAYLOAD: Any = {"input": [1, 2, 3]}
IRIS_PAYLOAD: Any = [5.1, 3.5, 1.4, 0.2]
WARMUP_REQUESTS = 5
REPO = Path(__file__).resolve().parent.parent
#: Where ``scripts/up`` builds the example archive.
DEFAULT_IRIS_MAR = REPO / "model_store" / "iris.mar"
IRIS_TRAIN = REPO / "examples" / "iris" / "train.py"

Progress = Callable[[str], None]
#: ``(target, concurrency, duration) -> result``: :func:`run_wrk` or :func:`run_python`.
LoadClient = Callable[[Target, int, float], LoadResult]


@dataclass(frozen=True)
class Point:
    """One measured load point."""

    model: str
    workers: int
    batch_size: int
    concurrency: int
    result: LoadResult

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "concurrency": self.concurrency,
            **self.result.as_dict(),
        }


@dataclass(frozen=True)
class MemoryReport:
    """The server's memory after one configuration's load, and one idle worker's."""

    model: str
    workers: int
    batch_size: int
    roles: tuple[memory.RoleMemory, ...]
    idle_worker: memory.ProcessInfo | None

    @property
    def total(self) -> memory.RoleMemory:
        """Every process of the tree together."""
        pss = [role.pss_mib for role in self.roles]
        return memory.RoleMemory(
            role="total",
            processes=sum(role.processes for role in self.roles),
            rss_mib=sum(role.rss_mib for role in self.roles),
            pss_mib=None if None in pss else sum(p or 0.0 for p in pss),
        )

    def as_dict(self) -> dict[str, Any]:
        idle = self.idle_worker
        return {
            "model": self.model,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "roles": [role.as_dict() for role in self.roles],
            "total": self.total.as_dict(),
            "idle_worker": None
            if idle is None
            else {
                "pid": idle.pid,
                "rss_mib": idle.rss / memory.MIB,
                "pss_mib": None if idle.pss is None else idle.pss / memory.MIB,
            },
        }


@dataclass
class Results:
    """Everything one run measured."""

    points: list[Point] = field(default_factory=list)
    memory: list[MemoryReport] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """What to measure and how."""

    models: Sequence[str]
    workers: Sequence[int]
    batch_sizes: Sequence[int]
    concurrency: Sequence[int]
    duration: float
    max_batch_delay: int
    client: str
    server_pid: int | None = None


@dataclass(frozen=True)
class ModelCase:
    """A model to measure: its name on the server, archive, request and answer check."""

    name: str
    archive: str
    payload: bytes
    content_type: str
    check: Callable[[bytes], str | None]


# -- models ---------------------------------------------------------------------------------


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def check_noop(body: bytes) -> str | None:
    """``None`` when ``body`` is the noop echo of :data:`NOOP_PAYLOAD`, else the problem."""
    if _json_or_none(body) != NOOP_PAYLOAD:
        return f"expected the request echoed ({json.dumps(NOOP_PAYLOAD)})"
    return None


def check_iris(body: bytes) -> str | None:
    """``None`` when ``body`` ranks setosa first (it is a setosa), else the problem."""
    answer = _json_or_none(body)
    if not isinstance(answer, dict) or not answer:
        return "expected a JSON object of species probabilities"
    if max(answer, key=lambda label: float(answer[label])) != "setosa":
        return "expected setosa as the most likely species"
    return None


def prepare_noop(store: Path) -> ModelCase:
    """Write ``bench-noop.mar`` into ``store``."""
    archive = write_archive(store, "bench-noop", NOOP_HANDLER)
    return ModelCase(
        "bench-noop", archive.name, json.dumps(NOOP_PAYLOAD).encode(), "application/json",
        check_noop,
    )  # fmt: skip


def prepare_iris(store: Path, iris_mar: Path | None, say: Progress) -> ModelCase:
    """Copy the iris archive into ``store`` as ``bench-iris.mar``.

    ``iris_mar`` given: it must exist. Not given: :data:`DEFAULT_IRIS_MAR` when it
    exists, else it is built with ``examples/iris/train.py`` in a temporary directory.
    """
    if not store.is_dir():
        raise BenchError(f"model store {store} is not a directory")
    source = iris_mar if iris_mar is not None else DEFAULT_IRIS_MAR
    target = store / "bench-iris.mar"
    if source.is_file():
        shutil.copyfile(source, target)
    elif iris_mar is None and IRIS_TRAIN.is_file():
        say(f"{DEFAULT_IRIS_MAR} is missing: building it with {IRIS_TRAIN}")
        with tempfile.TemporaryDirectory(prefix="bench-iris-") as tmp:
            done = subprocess.run(
                [sys.executable, str(IRIS_TRAIN), "--export-path", tmp],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode != 0:
                raise BenchError(f"{IRIS_TRAIN} failed:\n{(done.stdout + done.stderr).strip()}")
            shutil.copyfile(Path(tmp) / "iris.mar", target)
    else:
        raise BenchError(f"no iris archive at {source} (pass --iris-mar PATH)")
    return ModelCase(
        "bench-iris", target.name, json.dumps(IRIS_PAYLOAD).encode(), "application/json",
        check_iris,
    )  # fmt: skip


# -- one configuration ----------------------------------------------------------------------


def _unregister(management: Endpoint, name: str) -> None:
    management.call("DELETE", f"/models/{name}")


def _remove_leftover(management: Endpoint, name: str, say: Progress) -> None:
    reply = management.request("GET", f"/models/{name}")
    if reply.status == 404:
        return
    if reply.status != 200:
        management.call("GET", f"/models/{name}")  # raises with the details
    _unregister(management, name)
    say(f"unregistered {name} left over from an earlier run")


def _register(management: Endpoint, case: ModelCase, workers: int, batch: int, delay: int) -> None:
    params = {
        "url": case.archive,
        "model_name": case.name,
        "initial_workers": workers,
        "batch_size": batch,
        "max_batch_delay": delay,
        "synchronous": "true",
    }
    management.call("POST", "/models", params)
    expect_workers(management, case.name, workers, f"a synchronous register with {workers}")


def _warm_up(target: Target, case: ModelCase) -> None:
    for _ in range(WARMUP_REQUESTS):
        status, body = send_once(target)
        problem = None if status == 200 else f"status {status}"
        problem = problem or case.check(body)
        if problem:
            text = body[:300].decode(errors="replace")
            raise BenchError(f"warm-up POST {target.url}: {problem}; answered {status}: {text}")


def _idle_worker(pid: int) -> memory.ProcessInfo | None:
    found = memory.workers(memory.snapshot(pid), pid)
    return found[0] if found else None


def measure_throughput(
    plan: Plan,
    inference: str,
    management: Endpoint,
    store: Path,
    inference_token: str | None = None,
    iris_mar: Path | None = None,
    progress: Progress | None = None,
) -> Results:
    """Measure every point of ``plan``; raises :class:`BenchError` on the first failure.

    ``store`` must be the model store of the server behind ``management``; the archives
    written there are removed again at the end.
    """
    say = progress or (lambda _line: None)
    client: LoadClient = run_wrk if plan.client == "wrk" else run_python
    if plan.server_pid is not None:
        memory.check_pid(plan.server_pid)
    results = Results()
    for model in plan.models:
        if model not in MODELS:
            raise BenchError(f"unknown model {model!r} (known: {', '.join(MODELS)})")
        case = prepare_noop(store) if model == "noop" else prepare_iris(store, iris_mar, say)
        try:
            _measure_model(plan, case, model, inference, management, inference_token, client,
                           results, say)  # fmt: skip
        finally:
            (store / case.archive).unlink(missing_ok=True)
    return results


def _measure_model(
    plan: Plan,
    case: ModelCase,
    model: str,
    inference: str,
    management: Endpoint,
    token: str | None,
    client: LoadClient,
    results: Results,
    say: Progress,
) -> None:
    headers = {"Content-Type": case.content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    target = Target(f"{inference.rstrip('/')}/predictions/{case.name}", case.payload, headers)
    _remove_leftover(management, case.name, say)
    for workers in plan.workers:
        for batch in plan.batch_sizes:
            registered = True
            try:
                _register(management, case, workers, batch, plan.max_batch_delay)
                _warm_up(target, case)
                idle = None if plan.server_pid is None else _idle_worker(plan.server_pid)
                for concurrency in plan.concurrency:
                    result = client(target, concurrency, plan.duration)
                    results.points.append(Point(model, workers, batch, concurrency, result))
                    say(
                        f"{model} workers={workers} batch={batch} C={concurrency}: "
                        f"{result.requests_per_s:.1f} req/s, p50 {result.p50_ms:.2f} ms, "
                        f"p99 {result.p99_ms:.2f} ms, {result.errors} errors"
                    )
                if plan.server_pid is not None:
                    roles = memory.group(memory.snapshot(plan.server_pid), plan.server_pid)
                    results.memory.append(MemoryReport(model, workers, batch, tuple(roles), idle))
                registered = False
                _unregister(management, case.name)
            finally:
                if registered:
                    with contextlib.suppress(BenchError):
                        management.request("DELETE", f"/models/{case.name}")


# -- reports --------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Columns padded to width; the first ``left`` columns left-aligned, the rest right."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(results: Results, plan: Plan, inference: str) -> str:
    """The load table, then (with a server pid) the memory table and idle workers."""
    duration = plan.duration if plan.client == "python" else wrk_duration(plan.duration)
    client = "wrk -t1" if plan.client == "wrk" else "Python threads"
    points = [
        (
            p.model, str(p.workers), str(p.batch_size), str(p.concurrency),
            f"{p.result.requests_per_s:.1f}", f"{p.result.p50_ms:.2f}",
            f"{p.result.p99_ms:.2f}", str(p.result.errors),
        )
        for p in results.points
    ]  # fmt: skip
    lines = [
        f"throughput at {inference}: POST /predictions/<model>, {client}, "
        f"{duration:g} s per point, max_batch_delay {plan.max_batch_delay} ms",
        *_table(
            ("model", "workers", "batch", "concurrency", "req/s", "p50 ms", "p99 ms", "errors"),
            points,
            left=1,
        ),
    ]
    if results.memory:
        rows = [
            (
                m.model, str(m.workers), str(m.batch_size), r.role, str(r.processes),
                _mib(r.rss_mib), _mib(r.pss_mib),
            )
            for m in results.memory
            for r in (*m.roles, m.total)
        ]  # fmt: skip
        lines += [
            "",
            f"memory of pid {plan.server_pid} and its descendants after each configuration's "
            "load, MiB (RSS counts shared pages in every process; PSS splits them)",
            *_table(
                ("model", "workers", "batch", "role", "procs", "RSS MiB", "PSS MiB"), rows, left=4
            ),
            "",
        ]
        for m in results.memory:
            where = f"{m.model}, {m.workers} workers, batch {m.batch_size}"
            idle = m.idle_worker
            if idle is None:
                lines.append(f"idle worker ({where}): none found under pid {plan.server_pid}")
            else:
                lines.append(
                    f"idle worker ({where}): pid {idle.pid}, RSS {_mib(idle.rss / memory.MIB)} "
                    f"MiB, PSS {_mib(None if idle.pss is None else idle.pss / memory.MIB)} MiB"
                )
    return "\n".join(lines)


def to_json(results: Results, plan: Plan, inference: str) -> str:
    """Everything as one JSON document (latencies in ms, memory in MiB)."""
    return json.dumps(
        {
            "benchmark": "throughput",
            "inference": inference,
            "client": plan.client,
            "duration_s": plan.duration,
            "max_batch_delay_ms": plan.max_batch_delay,
            "server_pid": plan.server_pid,
            "points": [p.as_dict() for p in results.points],
            "memory": [m.as_dict() for m in results.memory],
        },
        indent=2,
    )
