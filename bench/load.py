"""Closed-loop HTTP load for a fixed time: ``wrk`` when installed, else Python threads.

Both clients keep ``concurrency`` keep-alive connections busy, each sending the same
request again as soon as the previous answer arrived, for ``duration`` seconds, and
return a :class:`LoadResult`: requests per second, median and 99th percentile latency,
and the errors (answers outside 2xx, plus requests that got no answer at all).

``wrk -t1`` (one client thread, event-driven) costs the machine far less CPU than Python
threads, which matters when client and server share a few cores; prefer it. The parsing
of wrk's report (:func:`parse_wrk_output`) and the Lua script that makes it POST
(:func:`lua_script`) are pure functions.
"""

from __future__ import annotations

import http.client
import math
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.client import BenchError

#: wrk's own request timeout is 2 s; a loaded server may legitimately take longer.
WRK_TIMEOUT = "30s"
PYTHON_TIMEOUT_S = 30.0
#: Milliseconds per unit of wrk's time formats (``units.c``: us, ms, s, m, h).
_TIME_UNITS_MS = {"us": 0.001, "µs": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = re.compile(r"(\d+(?:\.\d+)?)(us|µs|ms|s|m|h)")
_REQUESTS_PER_SEC = re.compile(r"^Requests/sec:\s+(\d+(?:\.\d+)?)\s*$", re.MULTILINE)
_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\S+)\s*$", re.MULTILINE)
_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses:\s+(\d+)\s*$", re.MULTILINE)
_SOCKET_ERRORS = re.compile(
    r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$", re.MULTILINE
)
_TOTAL = re.compile(r"^\s*(\d+) requests in (\S+), ", re.MULTILINE)


@dataclass(frozen=True)
class LoadResult:
    """What one load point measured; latencies in milliseconds."""

    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int = 0

    @property
    def errors(self) -> int:
        """Answers outside 2xx plus requests that failed without an answer."""
        return self.non_2xx + self.socket_errors

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "requests": self.requests,
            "seconds": self.seconds,
            "requests_per_s": self.requests_per_s,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "errors": self.errors,
            "non_2xx": self.non_2xx,
            "socket_errors": self.socket_errors,
        }


@dataclass(frozen=True)
class Target:
    """One request to repeat: URL, body and headers (``Content-Type`` included)."""

    url: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    method: str = "POST"


# -- pure helpers ---------------------------------------------------------------------------


def parse_wrk_time(text: str) -> float:
    """A wrk duration such as ``812.00us``, ``3.46ms``, ``1.02s`` or ``1.50m``, in ms."""
    match = _TIME.fullmatch(text.strip())
    if match is None:
        raise BenchError(f"not a wrk time: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_wrk_output(text: str) -> LoadResult:
    """The :class:`LoadResult` in the report of ``wrk --latency``.

    Reads ``N requests in T, ...``, ``Requests/sec:``, the ``50%`` and ``99%`` lines of
    the latency distribution, ``Non-2xx or 3xx responses:`` (absent when there were
    none) and ``Socket errors:`` (likewise). Raises :class:`BenchError` quoting the
    report when a required line is missing (e.g. wrk ran without ``--latency``).
    """
    rate = _REQUESTS_PER_SEC.search(text)
    total = _TOTAL.search(text)
    percentiles = {float(q): value for q, value in _PERCENTILE.findall(text)}
    if rate is None or total is None or 50.0 not in percentiles or 99.0 not in percentiles:
        raise BenchError(f"unexpected wrk output:\n{text.strip()}")
    non_2xx = _NON_2XX.search(text)
    sockets = _SOCKET_ERRORS.search(text)
    return LoadResult(
        requests=int(total.group(1)),
        seconds=parse_wrk_time(total.group(2)) / 1000.0,
        requests_per_s=float(rate.group(1)),
        p50_ms=parse_wrk_time(percentiles[50.0]),
        p99_ms=parse_wrk_time(percentiles[99.0]),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in sockets.groups()) if sockets else 0,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; 0.0 when empty.

    Nearest rank: the smallest value with at least ``q`` % of the values at or below
    it, so p50 of ``[1, 2, 3, 4]`` is 2 and p99 of 100 values is the 99th smallest.
    """
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {q}")
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(q / 100.0 * len(ordered)), 1)
    return ordered[rank - 1]


def lua_string(value: str | bytes) -> str:
    """``value`` as a double-quoted Lua string literal; any byte survives unchanged."""
    data = value.encode() if isinstance(value, str) else value
    out = []
    for byte in data:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def lua_script(target: Target) -> str:
    """The wrk Lua script that sends ``target``'s method, body and headers."""
    lines = [
        "-- written by scripts/bench throughput",
        f"wrk.method = {lua_string(target.method)}",
        f"wrk.body = {lua_string(target.body)}",
    ]
    for name, value in target.headers.items():
        lines.append(f"wrk.headers[{lua_string(name)}] = {lua_string(value)}")
    return "\n".join(lines) + "\n"


def wrk_duration(seconds: float) -> int:
    """wrk takes whole seconds only: ``seconds`` rounded up, at least 1."""
    return max(math.ceil(seconds), 1)


def choose_client(requested: str | None, wrk_path: str | None) -> str:
    """``"wrk"`` or ``"python"``: ``requested`` if given, else wrk when it is installed."""
    if requested == "wrk" and wrk_path is None:
        raise BenchError("--client wrk: wrk is not on PATH (Debian/Ubuntu: apt-get install wrk)")
    if requested is not None:
        return requested
    return "wrk" if wrk_path is not None else "python"


# -- the clients ----------------------------------------------------------------------------


def run_wrk(
    target: Target, concurrency: int, duration: float, wrk: str | None = None
) -> LoadResult:
    """Load ``target`` with ``wrk -t1 -c<concurrency>`` for ``duration`` s (rounded up)."""
    binary = wrk or shutil.which("wrk")
    if binary is None:
        raise BenchError("wrk is not on PATH")
    seconds = wrk_duration(duration)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "request.lua"
        script.write_text(lua_script(target))
        argv = [
            binary, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency",
            "--timeout", WRK_TIMEOUT, "-s", str(script), target.url,
        ]  # fmt: skip
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"wrk failed: {exc}") from exc
    if done.returncode != 0:
        raise BenchError(
            f"wrk exited with {done.returncode}: {(done.stdout + done.stderr).strip()}"
        )
    return parse_wrk_output(done.stdout)


class _Connection:
    """One keep-alive connection to the target's host, reopened when the server closes it."""

    def __init__(self, target: Target, timeout: float = PYTHON_TIMEOUT_S) -> None:
        parts = urlsplit(target.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BenchError(f"{target.url!r} is not an http(s)://host:port URL")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._target = target
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def send(self) -> tuple[int, bytes]:
        """One request; ``(status, body)``. Raises ``OSError``/``HTTPException`` on failure."""
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = kind(self._host, self._port, timeout=self._timeout)
        try:
            self._conn.request(
                self._target.method, self._path, self._target.body, dict(self._target.headers)
            )
            resp = self._conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, body

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def send_once(target: Target) -> tuple[int, bytes]:
    """Send ``target`` once on a fresh connection; :class:`BenchError` without an answer."""
    conn = _Connection(target)
    try:
        return conn.send()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{target.method} {target.url} failed: {exc}") from exc
    finally:
        conn.close()


def run_python(target: Target, concurrency: int, duration: float) -> LoadResult:
    """Load ``target`` from ``concurrency`` threads, one keep-alive connection each.

    Every thread repeats the request until ``duration`` seconds after the common start;
    latencies of all answers (any status) are pooled for the percentiles. A request
    that raises counts as a socket error and its connection is reopened.
    """
    if concurrency < 1:
        raise BenchError("concurrency must be at least 1")
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    non_2xx = [0] * concurrency
    failed = [0] * concurrency
    start_line = threading.Barrier(concurrency + 1)
    times: dict[str, float] = {}

    def client(slot: int) -> None:
        conn = _Connection(target)
        mine = latencies[slot]
        try:
            start_line.wait()
            deadline = times["deadline"]
            while (sent := time.perf_counter()) < deadline:
                try:
                    status, _body = conn.send()
                except (OSError, http.client.HTTPException):
                    failed[slot] += 1
                    continue
                mine.append((time.perf_counter() - sent) * 1000.0)
                if not 200 <= status < 300:
                    non_2xx[slot] += 1
        finally:
            conn.close()

    threads = [
        threading.Thread(target=client, args=(slot,), name=f"bench-load-{slot}", daemon=True)
        for slot in range(concurrency)
    ]
    for thread in threads:
        thread.start()
    begin = time.perf_counter()
    times["deadline"] = begin + duration
    start_line.wait()
    for thread in threads:
        thread.join()
    elapsed = max(time.perf_counter() - begin, 1e-9)
    pooled = [value for per_thread in latencies for value in per_thread]
    count = len(pooled) + sum(failed)
    return LoadResult(
        requests=count,
        seconds=elapsed,
        requests_per_s=len(pooled) / elapsed,
        p50_ms=percentile(pooled, 50),
        p99_ms=percentile(pooled, 99),
        non_2xx=sum(non_2xx),
        socket_errors=sum(failed),
    )
