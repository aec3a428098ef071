"""Slow clients: connections that send a request header one byte per second, forever.

A server that gives each connection a thread while it reads the request stops answering
other clients once the slow ones hold every thread; an event-driven one does not notice
them. :class:`SlowClients` keeps ``count`` such connections going from one background
thread (one ``send`` of one byte per connection per ``interval``; a connection the server
closes is reopened, so the pressure stays), and :func:`probe_latency` times ordinary
requests, each on a fresh connection as a new client's, while they do.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from urllib.parse import urlsplit

from bench.client import BenchError
from bench.load import Target

#: The header every slow client trickles: a real request line, then a header that never ends.
SLOW_PREFIX = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-Client: "
CONNECT_TIMEOUT_S = 5.0
#: How long a probe waits for its answer before it counts as stalled.
PROBE_TIMEOUT_S = 10.0


def header_bytes() -> Iterator[bytes]:
    """The bytes a slow client sends, one at a time: :data:`SLOW_PREFIX`, then ``a``
    forever (the header is never finished)."""
    for byte in SLOW_PREFIX:
        yield bytes((byte,))
    while True:
        yield b"a"


class _Slow:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None
        self.bytes = header_bytes()
        self.sent = 0

    def open(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT_S)
        self.bytes = header_bytes()

    def send_one(self) -> bool:
        """Send the next byte; False when the server had closed the connection."""
        if self.sock is None:
            return False
        try:
            self.sock.sendall(next(self.bytes))
        except OSError:
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


class SlowClients:
    """``count`` slow connections to ``url``'s host and port while the ``with`` block runs.

    ``rounds`` counts the intervals in which every connection has sent its byte;
    ``reopened`` the connections the server closed (each is opened again at once).
    """

    def __init__(self, url: str, count: int = 50, interval: float = 1.0) -> None:
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise BenchError(f"{url!r} has no host:port")
        self.address = (parts.hostname, parts.port)
        self.count = count
        self.interval = interval
        self.rounds = 0
        self.reopened = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="bench-slow-clients", daemon=True)
        self._clients = [_Slow(self.address) for _ in range(count)]

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for client in self._clients:
            client.close()

    def _run(self) -> None:
        try:
            for client in self._clients:
                client.open()
            while not self._stop.is_set():
                for client in self._clients:
                    if not client.send_one():
                        self.reopened += 1
                        client.close()
                        client.open()
                        client.send_one()
                with self._lock:
                    self.rounds += 1
                    self._lock.notify_all()
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by wait_rounds, never lost in the thread
            with self._lock:
                self._error = exc
                self._lock.notify_all()

    def wait_rounds(self, rounds: int, timeout: float = 60.0) -> None:
        """Block until every connection has sent ``rounds`` bytes; :class:`BenchError` if
        the clients failed (cannot connect) or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.rounds < rounds and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"slow clients: {self.rounds} of {rounds} rounds in {timeout} s"
                    )
                self._lock.wait(left)
            if self._error is not None:
                raise BenchError(f"slow clients to {self.address}: {self._error}")


def probe_once(target: Target, timeout: float = PROBE_TIMEOUT_S) -> float:
    """The latency (ms) of one request for ``target`` on a new connection, connecting
    included; a request with no answer within ``timeout`` counts as ``timeout`` (a stalled
    port is the finding, not a failure). :class:`BenchError` for an answer outside 2xx or
    a refused connection."""
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    started = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request(target.method, path, target.body or None, dict(target.headers))
        resp = conn.getresponse()
        body = resp.read()
    except TimeoutError:
        return timeout * 1000.0
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{target.method} {target.url} failed: {exc}") from exc
    finally:
        conn.close()
    elapsed = (time.perf_counter() - started) * 1000.0
    if not 200 <= resp.status < 300:
        text = body[:200].decode(errors="replace")
        raise BenchError(f"{target.method} {target.url} answered {resp.status}: {text}")
    return elapsed


def probe_latency(target: Target, probes: int) -> float:
    """The median of ``probes`` :func:`probe_once` latencies (ms), one after the other."""
    return statistics.median(probe_once(target) for _ in range(probes))


def latency_under_slow_clients(
    target: Target, count: int = 50, probes: int = 5, warm_rounds: int = 3
) -> tuple[float, int]:
    """Start ``count`` slow clients on ``target``'s port, let each send ``warm_rounds``
    bytes, then :func:`probe_latency`; ``(median ms, connections the server closed)``."""
    with SlowClients(target.url, count) as slow:
        slow.wait_rounds(warm_rounds)
        latency = probe_latency(target, probes)
        return latency, slow.reopened
