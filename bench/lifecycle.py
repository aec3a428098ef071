"""How long model lifecycle operations take on a TorchServe-compatible management API.

:func:`measure_lifecycle` writes a no-op archive ``bench-noop.mar`` into the server's
model store, then ``runs`` times: registers it synchronously with one worker, scales it
synchronously to 4 workers and back to 1, and unregisters it, timing each call. With
``slow_init`` it also times a synchronous register of ``bench-slow.mar``, whose handler
sleeps that long while initialising. The same requests work on TorchServe 0.12, so the
numbers of both servers can be compared.

Every answer is checked: a synchronous call must answer 200 (TorchServe's 202 and 206
mean the work was not finished, so the time would be meaningless), and after each
register or scale the model's description must list the expected number of workers.
Any other answer raises :class:`~bench.client.BenchError`. The models are unregistered
and the archives removed again, also when a run fails.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.client import BenchError, Endpoint, expect_workers

NOOP_MODEL = "bench-noop"
SLOW_MODEL = "bench-slow"
SCALE_UP = 4
#: Fixed zip timestamps, so that the archives are byte-identical on every run.
_ZIP_DATE = (2026, 1, 1, 0, 0, 0)

NOOP_HANDLER = '''\
"""Benchmark handler: answers each request with its body."""


def handle(data, context):
    return None if data is None else [row.get("body") for row in data]
'''

SLOW_HANDLER = '''\
"""Benchmark handler: initialising takes {seconds} s, then it answers with the body."""

import time


def handle(data, context):
    if data is None:
        time.sleep({seconds})
        return None
    return [row.get("body") for row in data]
'''

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Row:
    """One measured operation: its key, a human label and the seconds of each run."""

    key: str
    label: str
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON-ready data (seconds)."""
        return {
            "key": self.key,
            "what": self.label,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "samples": list(self.samples),
        }


def handler_module(model_name: str) -> str:
    """The handler file name used in the archive of ``model_name``."""
    return model_name.replace("-", "_") + "_handler.py"


def write_archive(store: Path, model_name: str, handler_source: str) -> Path:
    """Write ``store/<model_name>.mar`` (manifest + function handler) atomically.

    The layout is torch-model-archiver's: files at the zip root plus
    ``MAR-INF/MANIFEST.json``. Raises :class:`BenchError` if ``store`` is not a directory.
    """
    if not store.is_dir():
        raise BenchError(f"model store {store} is not a directory")
    handler = handler_module(model_name)
    manifest = {
        "createdOn": "01/01/2026 00:00:00",
        "runtime": "python",
        "model": {"modelName": model_name, "handler": handler, "modelVersion": "1.0"},
        "archiverVersion": "0.12.0",
    }
    target = store / f"{model_name}.mar"
    partial = store / f".{model_name}.mar.partial"
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as mar:
        for name, text in (
            (handler, handler_source),
            ("MAR-INF/MANIFEST.json", json.dumps(manifest, indent=2)),
        ):
            mar.writestr(zipfile.ZipInfo(name, _ZIP_DATE), text)
    partial.replace(target)
    return target


class _Model:
    """The management calls on one benchmark model, each checked."""

    def __init__(self, endpoint: Endpoint, name: str) -> None:
        self.endpoint = endpoint
        self.name = name
        self.registered = False

    def remove_leftover(self) -> bool:
        """Unregister ``name`` if an earlier, interrupted run left it; True if it did."""
        reply = self.endpoint.request("GET", f"/models/{self.name}")
        if reply.status == 404:
            return False
        if reply.status != 200:
            self.endpoint.call("GET", f"/models/{self.name}")  # raises with the details
        self.endpoint.call("DELETE", f"/models/{self.name}")
        return True

    def register(self) -> float:
        params = {"url": f"{self.name}.mar", "initial_workers": 1, "synchronous": "true"}
        self.registered = True  # from now on, clean up: a failed answer may leave it behind
        seconds = _timed(lambda: self.endpoint.call("POST", "/models", params))
        self.expect_workers(1)
        return seconds

    def scale(self, workers: int) -> float:
        params = {"min_worker": workers, "synchronous": "true"}
        seconds = _timed(lambda: self.endpoint.call("PUT", f"/models/{self.name}", params))
        self.expect_workers(workers)
        return seconds

    def unregister(self) -> float:
        seconds = _timed(lambda: self.endpoint.call("DELETE", f"/models/{self.name}"))
        self.registered = False
        self.endpoint.call("GET", f"/models/{self.name}", expect=404)
        return seconds

    def expect_workers(self, count: int) -> None:
        expect_workers(self.endpoint, self.name, count, f"a synchronous change to {count}")

    def cleanup(self) -> None:
        """Best effort, for the failure path: never raises, never hides the first error."""
        if self.registered:
            with contextlib.suppress(BenchError):
                self.endpoint.request("DELETE", f"/models/{self.name}")
            self.registered = False


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_lifecycle(
    endpoint: Endpoint,
    store: Path,
    runs: int = 5,
    slow_init: float = 0.0,
    progress: Progress | None = None,
) -> list[Row]:
    """Measure the lifecycle operations ``runs`` times; one :class:`Row` per operation.

    ``store`` must be the model store of the server behind ``endpoint`` (the server
    reads ``bench-noop.mar`` from there). ``slow_init > 0`` adds the slow-initialise
    row. Raises :class:`BenchError` on the first unexpected answer.
    """
    if runs < 1:
        raise BenchError("runs must be at least 1")
    say = progress or (lambda _line: None)
    samples: dict[str, list[float]] = {
        key: [] for key in ("register", "scale_up", "scale_down", "unregister")
    }
    noop = _Model(endpoint, NOOP_MODEL)
    archive = write_archive(store, NOOP_MODEL, NOOP_HANDLER)
    try:
        if noop.remove_leftover():
            say(f"unregistered {NOOP_MODEL} left over from an earlier run")
        for run in range(1, runs + 1):
            samples["register"].append(noop.register())
            samples["scale_up"].append(noop.scale(SCALE_UP))
            samples["scale_down"].append(noop.scale(1))
            samples["unregister"].append(noop.unregister())
            say(f"run {run}/{runs}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in samples.items()))
    finally:
        noop.cleanup()
        archive.unlink(missing_ok=True)
    rows = [
        Row("register", "sync register, 1 worker", tuple(samples["register"])),
        Row("scale_up", f"sync scale 1->{SCALE_UP}", tuple(samples["scale_up"])),
        Row("scale_down", f"sync scale {SCALE_UP}->1", tuple(samples["scale_down"])),
        Row("unregister", "unregister", tuple(samples["unregister"])),
    ]
    if slow_init > 0:
        rows.append(_measure_slow(endpoint, store, runs, slow_init, say))
    return rows


def _measure_slow(endpoint: Endpoint, store: Path, runs: int, seconds: float, say: Progress) -> Row:
    slow = _Model(endpoint, SLOW_MODEL)
    archive = write_archive(store, SLOW_MODEL, SLOW_HANDLER.format(seconds=float(seconds)))
    times: list[float] = []
    try:
        if slow.remove_leftover():
            say(f"unregistered {SLOW_MODEL} left over from an earlier run")
        for run in range(1, runs + 1):
            times.append(slow.register())
            slow.unregister()
            say(f"slow run {run}/{runs}: register {times[-1]:.3f} s")
    finally:
        slow.cleanup()
        archive.unlink(missing_ok=True)
    return Row("register_slow_init", f"sync register, {seconds:g} s initialize", tuple(times))


def format_table(rows: list[Row], management: str, runs: int) -> str:
    """The rows as a plain-text table with median, min and max in seconds."""
    width = max(len("what"), *(len(row.label) for row in rows))
    lines = [
        f"lifecycle at {management}, {runs} runs, seconds",
        f"{'what':<{width}}  {'median':>8}  {'min':>8}  {'max':>8}",
    ]
    for row in rows:
        lines.append(f"{row.label:<{width}}  {row.median:>8.3f}  {row.min:>8.3f}  {row.max:>8.3f}")
    return "\n".join(lines)


def to_json(rows: list[Row], management: str, runs: int) -> str:
    """The rows as one JSON document (seconds)."""
    return json.dumps(
        {
            "benchmark": "lifecycle",
            "management": management,
            "runs": runs,
            "unit": "s",
            "rows": [row.as_dict() for row in rows],
        },
        indent=2,
    )
