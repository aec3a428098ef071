"""The asynchronous inference port (issue 11) over real Redis and real workers: chunked
request bodies, slow clients that cost no thread, and read-your-writes routing.

No timed assertions: a request that should not be stalled is asserted to be answered
(within a generous client timeout), never how fast.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import api_process, supervisor_process

#: Echoes its body; says which version answered (so routing can be asserted).
HANDLER = """
def handle(data, context):
    if data is None:
        return None
    out = []
    for row in data:
        body = row.get("body")
        if isinstance(body, (bytes, bytearray)):
            body = {"bytes": len(body)}
        out.append({"version": "%s", "echo": body})
    return out
"""
LIMIT = 10_000


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    for version in ("1.0", "2.0"):
        handler = (HANDLER % version).encode()
        build_mar(store / f"echo-{version}.mar", "echo", version,
                  extra={"noop_handler.py": handler})  # fmt: skip
    settings = stack_settings.replace(max_request_size=LIMIT)
    with (
        api_process(settings, tmp_path / "api") as management,
        api_process(settings, tmp_path / "api", "inference") as inference,
        supervisor_process(settings, tmp_path / "h1", "h1"),
    ):
        api = ManagementClient(management)
        response = api.register_model_with_params(
            {"url": "echo-1.0.mar", "initial_workers": 1, "synchronous": "true"}
        )
        assert response.status == 200, response.body
        yield {"api": api, "base": inference}


def address(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def exchange(base: str, raw: bytes) -> tuple[int, bytes]:
    """Send ``raw`` as it is on a fresh connection; the status and body of the answer."""
    with socket.create_connection(address(base), timeout=60) as sock:
        sock.sendall(raw)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


def chunked(path: str, pieces: list[bytes]) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return head + body + b"0\r\n\r\n"


def predict(base: str, payload: Any, model: str = "echo") -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*address(base), timeout=60)
    try:
        conn.request("POST", f"/predictions/{model}", json.dumps(payload),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_chunked_body_reaches_the_handler_whole(stack: dict[str, Any]) -> None:
    payload = {"text": "x" * 3000, "n": list(range(200))}
    raw = json.dumps(payload).encode()
    pieces = [raw[i : i + 700] for i in range(0, len(raw), 700)]
    status, body = exchange(stack["base"], chunked("/predictions/echo", pieces))
    assert status == 200, body
    assert json.loads(body) == {"version": "1.0", "echo": payload}


def test_a_chunked_body_over_the_limit_is_a_bare_413(stack: dict[str, Any]) -> None:
    pieces = [b"x" * 4000] * 3  # 12 000 bytes > max_request_size
    status, body = exchange(stack["base"], chunked("/predictions/echo", pieces))
    assert (status, body) == (413, b"")
    assert predict(stack["base"], {"after": 1}) == (200, {"version": "1.0", "echo": {"after": 1}})


@contextlib.contextmanager
def slow_clients(base: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections stalled half-way: half in their headers, half in a body
    they announced but never finish."""
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection(address(base), timeout=60)
            socks.append(sock)
            if i % 2:
                sock.sendall(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            else:
                sock.sendall(
                    b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\n"
                    b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"a"'
                )
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_slow_clients_do_not_stall_the_port(stack: dict[str, Any]) -> None:
    base = stack["base"]
    with slow_clients(base, 50) as socks:
        # Each stalled client trickles one more byte; none of them blocks the others.
        for _ in range(3):
            for sock in socks:
                sock.sendall(b"b" if socks.index(sock) % 2 else b" ")
            assert predict(base, {"during": True}) == (
                200,
                {"version": "1.0", "echo": {"during": True}},
            )
        status, _ = exchange(base, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200


def test_requests_follow_set_default_at_once(stack: dict[str, Any]) -> None:
    """Read your writes: once set-default has returned, the next request (another
    connection, no pause) is routed to the new default."""
    api, base = stack["api"], stack["base"]
    response = api.register_model_with_params(
        {"url": "echo-2.0.mar", "initial_workers": 1, "synchronous": "true"}
    )
    assert response.status == 200, response.body
    for round_ in range(6):
        version = "2.0" if round_ % 2 == 0 else "1.0"
        response = api.request("PUT", f"/models/echo/{version}/set-default")
        assert response.status == 200, response.body
        assert predict(base, {"round": round_}) == (
            200,
            {"version": version, "echo": {"round": round_}},
        )
