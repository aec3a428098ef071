"""gunicorn's worker for the ASGI ports (inference 8080, management 8081): uvicorn with
uvloop and httptools, refusing what Netty refuses, in TorchServe's JSON.

:class:`JsonErrorUvicornWorker` is ``uvicorn_worker.UvicornWorker`` with its HTTP
protocol replaced by :class:`NettyLimitsProtocol`, which answers before any application
code runs, with the bytes of ``control.http.limits.error_response`` (the same as the
gthread worker of the metrics port sends), then closes the connection:

* a request line longer than :data:`MAX_REQUEST_LINE` bytes: 414, as soon as the line
  grows past it (a 100 kB URL is never buffered whole);
* a header field longer than :data:`MAX_HEADER_FIELD` bytes (name, ``": "`` and value)
  or more than :data:`MAX_HEADER_FIELDS` fields: 431; a request head larger than any
  head within both limits is 431 as it arrives, so a never-ending header costs at most
  that much memory;
* a transfer coding other than ``chunked`` (``Transfer-Encoding: gzip``): 501;
* anything else httptools cannot parse: 400 ``Invalid HTTP request: <reason>``.

Slow or idle clients hold no thread: a connection is a few kB of event-loop state, so
clients trickling their headers do not keep others from being answered. A keep-alive
connection idle for ``--keep-alive`` seconds (:data:`KEEP_ALIVE_S` where
``control.stack.children.api_child`` runs it) is closed. On SIGTERM the worker stops
accepting, lets in-flight requests finish for gunicorn's ``--graceful-timeout``
(``stop_grace``) and then cancels what is left. uvicorn's access log is written only
when gunicorn has an access log (``--access-logfile``, set by ``enable_access_log``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

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
    "ASGI_WORKER_CLASS",
    "KEEP_ALIVE_S",
    "MAX_HEAD_BYTES",
    "JsonErrorUvicornWorker",
    "NettyLimitsProtocol",
]

ASGI_WORKER_CLASS = "control.http.asgi_worker.JsonErrorUvicornWorker"
#: Seconds an idle keep-alive connection stays open after its last response (gunicorn's
#: ``--keep-alive``; uvicorn's default). Clients that pool connections reconnect after a
#: pause; a busy connection is never closed.
KEEP_ALIVE_S = 5
#: The largest request head (request line and headers, with their CRLFs) that can be
#: within both limits: receiving more before the head ends means a limit is broken.
MAX_HEAD_BYTES = (MAX_REQUEST_LINE + 2) + MAX_HEADER_FIELDS * (MAX_HEADER_FIELD + 2) + 2
#: " " between method and target, and " HTTP/1.1" after it.
_LINE_OVERHEAD = len(" ") + len(" HTTP/1.1")


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the status is on the protocol."""


class NettyLimitsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with Netty's limits and JSON errors (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refusal: tuple[int, str] | None = None
        self._refused = False
        self._in_head = True
        self._head_bytes = 0
        self._fields = 0
        self._drained = 0
        self._close_timer: asyncio.TimerHandle | None = None

    # -- receiving -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:  # read and drop what a refused client still sends
            self._drained += len(data)
            if self._drained > DRAIN_BYTES:
                self.transport.close()
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, HEADERS_TOO_LARGE)
                return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if self._refusal is not None:  # a limit, raised from a callback
                self._refuse(*self._refusal)
                return
            reason = str(exc)
            self.logger.warning("Invalid HTTP request received: %s", reason)
            if "Transfer-Encoding" in reason and "invalid" in reason.lower():
                # llhttp's wording for a coding it cannot decode (gunicorn's 501).
                self._refuse(501, SERVER_ERROR)
            else:
                self._refuse(400, invalid_request(reason))

    def eof_received(self) -> None:
        if self._refused:  # the client has sent all it will: the drain is over
            self.transport.close()
            return
        super().eof_received()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._fields = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        # Called for every piece of the target as it arrives: an over-long line is
        # refused before the rest of it is read.
        method = self.parser.get_method() or b""
        if len(method) + len(self.url) + _LINE_OVERHEAD > MAX_REQUEST_LINE:
            self._limit(414, LINE_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > MAX_HEADER_FIELDS or len(name) + 2 + len(value) > MAX_HEADER_FIELD:
            self._limit(431, HEADERS_TOO_LARGE)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text 400, replaced by TorchServe's JSON (never reached through
        :meth:`data_received`, which refuses by itself; kept for any other caller)."""
        self._refuse(400, invalid_request(msg))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        super().connection_lost(exc)

    # -- refusing ------------------------------------------------------------------------

    def _limit(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        raise _Refused()

    def _refuse(self, status: int, message: str) -> None:
        """Send the JSON error, half-close, and drop what the client still sends for at
        most :data:`DRAIN_SECONDS`: closing with unread data would reset the connection,
        which can destroy the response before the client has read it."""
        if self._refused:
            return
        self._refused = True
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The head parsed before the body failed (a bad chunk): the application must
            # not write into the connection now carrying the refusal.
            cycle.disconnected = True
            cycle.message_event.set()
        if self.transport.is_closing():
            return
        self.transport.write(error_response(status, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._close_timer = self.loop.call_later(DRAIN_SECONDS, self.transport.close)
        else:
            self.transport.close()


class JsonErrorUvicornWorker(UvicornWorker):  # type: ignore[misc]  # gunicorn has no types
    """uvicorn's gunicorn worker: uvloop, :class:`NettyLimitsProtocol`, no websockets, no
    ``Server`` header (TorchServe sends none), and gunicorn's graceful timeout."""

    CONFIG_KWARGS: dict[str, Any] = {  # noqa: RUF012  # uvicorn_worker's own interface
        "loop": "uvloop",
        "http": NettyLimitsProtocol,
        "ws": "none",
        "server_header": False,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # In-flight requests get --graceful-timeout (stop_grace) seconds after SIGTERM,
        # then uvicorn cancels them itself rather than the arbiter SIGKILLing it.
        self.config.timeout_graceful_shutdown = int(self.cfg.graceful_timeout)
