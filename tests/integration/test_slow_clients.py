"""Slow clients do not stall a port: while 50 connections send their request one header
byte a second, other clients are answered (uvicorn's worker, control.http.asgi_worker:
a trickling connection holds no thread). Speed is the benchmark's business; this only
asserts that the normal requests are answered while the slow ones are still going."""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from control.core.settings import Settings
from tests.support.processes import api_process, wait_for

SLOW_CLIENTS = 50
#: What each slow client sends, one byte a second: it never finishes its headers.
TRICKLE = b"GET /models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 1000


class Trickle:
    """``SLOW_CLIENTS`` connections, each sending one byte of :data:`TRICKLE` a second."""

    def __init__(self, port: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(SLOW_CLIENTS)]
        self.sent = 0  # bytes sent on every connection
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.sent < len(TRICKLE):
            for sock in self.socks:
                sock.sendall(TRICKLE[self.sent : self.sent + 1])
            self.sent += 1
            self._stop.wait(1.0)  # the pace of a slow client, not a wait for a condition

    def still_open(self) -> list[bool]:
        """For each connection: the server has neither answered nor closed it."""
        states = []
        for sock in self.socks:
            sock.setblocking(False)
            try:
                sock.recv(1)  # an answer or the end of the stream: not waiting any more
                states.append(False)
            except BlockingIOError:
                states.append(True)  # nothing to read: open and waiting for us
            finally:
                sock.setblocking(True)
        return states

    @contextmanager
    def running(self) -> Iterator[Trickle]:
        with ExitStack() as stack:
            for sock in self.socks:
                stack.callback(sock.close)
            self._thread.start()
            stack.callback(self._thread.join, 5)
            stack.callback(self._stop.set)
            yield self


def answer(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("app", "path"), [("management", "/models"), ("inference", "/ping")])
def test_slow_clients_do_not_stall_the_port(
    app: str, path: str, stack_settings: Settings, tmp_path: Path
) -> None:
    with api_process(stack_settings, tmp_path / app, app) as base:
        port = int(base.rsplit(":", 1)[1])
        with Trickle(port).running() as slow:
            wait_for(lambda: slow.sent >= 3, 30, "the slow clients to start trickling")
            for _ in range(3):
                status, body = answer(port, path)
                assert status == 200, body
            # The slow clients were still connected, their requests unfinished, throughout.
            assert slow.sent < len(TRICKLE)
            assert slow.still_open() == [True] * SLOW_CLIENTS
