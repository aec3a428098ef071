"""gunicorn's gthread worker, answering requests it cannot parse in TorchServe's JSON.

The metrics port (8082) runs it; the inference and management ports run uvicorn's ASGI
worker with the same limits and errors (``control.http.asgi_worker``).

gunicorn refuses a malformed request, or one past its limits, before any application
code runs, and answers with an HTML page. :class:`JsonErrorWorker` lets gunicorn decide
and log as it always does, then sends the same status as a TorchServe-shaped error
(``control.http.limits.error_response``):

* a request line longer than :data:`MAX_REQUEST_LINE` bytes: 414;
* a header field longer than :data:`MAX_HEADER_FIELD` bytes, or more than
  :data:`MAX_HEADER_FIELDS` fields: 431;
* any other malformed request: gunicorn's status (400 mostly, 501 for an unknown
  transfer coding), with gunicorn's reason as the message.

The limits are Netty's defaults, as TorchServe runs it (longest initial line 4096,
headers 8192 bytes): :data:`LIMIT_ARGS` passes them on gunicorn's command line, where
``control.stack.children.api_child`` runs the metrics port with ``-k`` :data:`WORKER_CLASS`.
"""

from __future__ import annotations

import re
import socket
import time
from typing import Any

from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.gthread import ThreadWorker

from control.http.limits import (
    DRAIN_BYTES,
    DRAIN_SECONDS,
    HEADERS_TOO_LARGE,
    LINE_TOO_LONG,
    MAX_HEADER_FIELD,
    MAX_HEADER_FIELDS,
    MAX_REQUEST_LINE,
    SERVER_ERROR,
    error_response,
    invalid_request,
)

__all__ = [
    "LIMIT_ARGS",
    "MAX_HEADER_FIELD",
    "MAX_HEADER_FIELDS",
    "MAX_REQUEST_LINE",
    "WORKER_CLASS",
    "JsonErrorWorker",
    "error_message",
    "error_response",
]

WORKER_CLASS = "control.http.gunicorn_worker.JsonErrorWorker"
#: gunicorn counts a header field's CRLF too, hence the ``+ 2``.
LIMIT_ARGS = (
    "--limit-request-line", str(MAX_REQUEST_LINE),
    "--limit-request-field_size", str(MAX_HEADER_FIELD + 2),
    "--limit-request-fields", str(MAX_HEADER_FIELDS),
)  # fmt: skip

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3}) ")


class _Capture:
    """Stands in for the client socket while gunicorn writes its HTML error."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        self.data += data

    def gettimeout(self) -> float:
        return 0.0  # gunicorn's write_nonblock then just calls sendall

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class JsonErrorWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn has no types
    """``gthread`` with TorchServe-shaped JSON instead of gunicorn's HTML error pages."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """Answer ``exc`` (raised before or outside the application) in JSON.

        gunicorn picks the status, logs the error and writes its access log line; its
        HTML page goes to a capture and is replaced by :func:`error_response`.
        """
        capture = _Capture(client)
        super().handle_error(req, capture, addr, exc)
        match = _STATUS_LINE.match(bytes(capture.data))
        status = int(match.group(1)) if match else 500
        try:
            client.sendall(error_response(status, error_message(exc, status)))
            _drain(client)
        except OSError:
            self.log.debug("Failed to send error message.")


def error_message(exc: BaseException, status: int) -> str:
    """The ``message`` of the JSON error for ``exc``."""
    if isinstance(exc, LimitRequestLine):
        return LINE_TOO_LONG
    if isinstance(exc, LimitRequestHeaders):
        return HEADERS_TOO_LARGE
    if status >= 500:
        return SERVER_ERROR
    return invalid_request(str(exc))


def _drain(client: socket.socket) -> None:
    """Half-close, then read what the client still sends (bounded), so that closing does
    not reset the connection before the client has read the response."""
    client.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + DRAIN_SECONDS
    left = DRAIN_BYTES
    while left > 0:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        client.settimeout(remaining)
        try:
            chunk = client.recv(min(left, 65536))
        except (TimeoutError, BlockingIOError):
            return
        if not chunk:
            return
        left -= len(chunk)
