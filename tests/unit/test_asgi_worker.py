"""The ASGI ports' HTTP protocol (control.http.asgi_worker): Netty's limits and parse
errors answered with TorchServe's JSON bytes, before any application code runs, then a
half-close. Driven here through a fake transport; tests/integration/test_request_bounds.py
runs the same limits against the real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from control.core.home import Home
from control.core.settings import Settings, apply_properties
from control.http.asgi_worker import (
    ASGI_WORKER_CLASS,
    KEEP_ALIVE_S,
    MAX_HEAD_BYTES,
    JsonErrorUvicornWorker,
    NettyLimitsProtocol,
)
from control.http.gunicorn_worker import WORKER_CLASS
from control.http.limits import HEADERS_TOO_LARGE, LINE_TOO_LONG, SERVER_ERROR
from control.stack.children import access_log_args, worker_args


class Transport(asyncio.Transport):
    """Records what the protocol writes and whether it half-closed or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.data = b""
        self.eof = False
        self.closed = False

    def write(self, data: Any) -> None:
        self.data += bytes(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8081), "peername": ("127.0.0.1", 5000)}.get(name)


calls: list[dict[str, Any]] = []


async def app(scope: Any, receive: Any, send: Any) -> None:
    calls.append(scope)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    # Let the requests' tasks end before the loop goes.
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


def connect(loop: asyncio.AbstractEventLoop) -> tuple[NettyLimitsProtocol, Transport]:
    calls.clear()
    config = Config(app=app, http=NettyLimitsProtocol, lifespan="off", log_config=None)
    config.load()
    proto = NettyLimitsProtocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = Transport()
    proto.connection_made(transport)
    return proto, transport


def refusal(transport: Transport) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = transport.data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert transport.eof and not transport.closed  # half-closed, draining
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, json.loads(body)


def feed(proto: NettyLimitsProtocol, data: bytes, piece: int = 0) -> None:
    if piece:
        for i in range(0, len(data), piece):
            proto.data_received(data[i : i + piece])
    else:
        proto.data_received(data)


@pytest.mark.parametrize("piece", [0, 7], ids=["whole", "in-pieces"])
def test_a_long_request_line_is_414_before_it_ends(
    loop: asyncio.AbstractEventLoop, piece: int
) -> None:
    proto, transport = connect(loop)
    feed(proto, b"GET /" + b"p" * 5000, piece)  # no end of line yet
    status, _, body = refusal(transport)
    assert status == 414
    assert body == {"code": 414, "type": "BadRequestException", "message": LINE_TOO_LONG}
    assert calls == []


def test_a_line_of_exactly_4096_bytes_is_served(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = connect(loop)
    target = "/" + "p" * (4096 - len("GET / HTTP/1.1"))
    assert len(f"GET {target} HTTP/1.1") == 4096
    proto.data_received(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    loop.run_until_complete(asyncio.sleep(0))  # let the request's task run
    assert transport.data.startswith(b"HTTP/1.1 200 OK")
    assert [scope["path"] for scope in calls] == [target]


@pytest.mark.parametrize(
    "headers",
    [
        "X-Pad: " + "h" * (8192 - len("X-Pad: ") + 1) + "\r\n",
        "".join(f"X-{i}: v\r\n" for i in range(101)),
    ],
    ids=["long-field", "many-fields"],
)
def test_header_limits_are_431(loop: asyncio.AbstractEventLoop, headers: str) -> None:
    proto, transport = connect(loop)
    proto.data_received(f"GET / HTTP/1.1\r\n{headers}\r\n".encode())
    status, _, body = refusal(transport)
    assert status == 431
    assert body["message"] == HEADERS_TOO_LARGE
    assert calls == []


def test_a_head_that_never_ends_is_refused_once_no_head_within_limits_is_that_long(
    loop: asyncio.AbstractEventLoop,
) -> None:
    proto, transport = connect(loop)
    proto.data_received(b"GET / HTTP/1.1\r\nX-Endless: ")
    sent = 0
    while not transport.data and sent <= MAX_HEAD_BYTES:
        proto.data_received(b"v" * 4096)
        sent += 4096
    status, _, _ = refusal(transport)
    assert status == 431
    assert sent <= MAX_HEAD_BYTES + 4096  # refused as it arrived, not after


def test_garbage_is_400_with_the_parsers_reason(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = connect(loop)
    proto.data_received(b"NOT-HTTP\r\n\r\n")
    status, headers, body = refusal(transport)
    assert status == 400
    assert body["type"] == "BadRequestException"
    assert body["message"].startswith("Invalid HTTP request: ")
    assert len(headers["x-request-id"]) == 36


def test_an_unknown_transfer_coding_is_501(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport = connect(loop)
    proto.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc")
    status, _, body = refusal(transport)
    assert status == 501
    assert body == {"code": 501, "type": "InternalServerException", "message": SERVER_ERROR}
    # The head had parsed, so the application started; it cannot write after the refusal.
    answered = transport.data
    loop.run_until_complete(asyncio.sleep(0))
    assert len(calls) == 1 and transport.data == answered


def test_after_a_refusal_what_the_client_sends_is_dropped_then_closed(
    loop: asyncio.AbstractEventLoop,
) -> None:
    proto, transport = connect(loop)
    proto.data_received(b"NOT-HTTP\r\n\r\n")
    answered = transport.data
    proto.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # read and dropped
    assert transport.data == answered and not transport.closed
    proto.eof_received()  # the client is done: close
    assert transport.closed


def test_the_worker_class_uses_uvloop_and_the_protocol() -> None:
    assert ASGI_WORKER_CLASS == "control.http.asgi_worker.JsonErrorUvicornWorker"
    assert JsonErrorUvicornWorker.CONFIG_KWARGS["loop"] == "uvloop"
    assert JsonErrorUvicornWorker.CONFIG_KWARGS["http"] is NettyLimitsProtocol
    assert JsonErrorUvicornWorker.CONFIG_KWARGS["server_header"] is False


def test_inference_and_management_run_the_asgi_worker_metrics_gthread() -> None:
    for which in ("inference", "management"):
        argv = worker_args(which, 16)
        assert argv[:2] == ("-k", ASGI_WORKER_CLASS)
        assert argv[argv.index("--keep-alive") + 1] == str(KEEP_ALIVE_S)
        assert "--threads" not in argv
    argv = worker_args("metrics", 16)
    assert argv[:2] == ("-k", WORKER_CLASS)
    assert argv[argv.index("--threads") + 1] == "16"
    assert "--limit-request-line" in argv


def test_the_access_log_is_off_unless_configured(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert access_log_args(Settings(home=tmp_path), home, "inference") == ()
    settings = apply_properties(Settings(home=tmp_path), {"enable_access_log": "true"})
    assert settings.enable_access_log
    assert access_log_args(settings, home, "inference") == (
        "--access-logfile",
        str(tmp_path / "logs" / "access_inference.log"),
    )
