"""Netty's request limits, as TorchServe runs it, and the raw JSON error both gunicorn
worker classes send when a request breaks them or does not parse.

A request refused before any application code runs (a request line or header past the
limits, bytes that are not HTTP) is answered by the server worker itself, so the
response is built here as complete bytes: TorchServe's ``{"code", "type", "message"}``
body, its no-cache headers, a fresh ``x-request-id`` and ``Connection: close``.
``control.http.gunicorn_worker`` (gthread, the metrics port) and
``control.http.asgi_worker`` (uvicorn, the inference and management ports) both use it.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus

from control.http.common import NO_CACHE_HEADERS, dumps

#: Netty's (TorchServe's) longest initial request line, in bytes.
MAX_REQUEST_LINE = 4096
#: Longest header field (name, colon and value, without its CRLF), in bytes: Netty's
#: header size limit.
MAX_HEADER_FIELD = 8192
#: Most header fields in one request (gunicorn's default).
MAX_HEADER_FIELDS = 100

LINE_TOO_LONG = f"The request line is longer than {MAX_REQUEST_LINE} bytes."
HEADERS_TOO_LARGE = (
    f"The request headers are too large (at most {MAX_HEADER_FIELDS} fields of "
    f"at most {MAX_HEADER_FIELD} bytes each)."
)
#: The ``message`` of a 5xx refusal (an unsupported transfer coding).
SERVER_ERROR = "Error while handling the request."
#: After the error is sent, what the client still sends is read and dropped, for at most
#: this long and this much: closing a socket with unread data makes the kernel answer
#: with a reset, which can destroy the response before the client has read it.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 1024 * 1024


def invalid_request(reason: str) -> str:
    """The ``message`` of a 400 for a request that does not parse."""
    return f"Invalid HTTP request: {reason[:200]}"


def error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying TorchServe's error body and headers."""
    type_ = "InternalServerException" if status >= 500 else "BadRequestException"
    body = dumps({"code": status, "type": type_, "message": message})
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "x-request-id": str(uuid.uuid4()),
        **NO_CACHE_HEADERS,
        "connection": "close",
    }
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body
