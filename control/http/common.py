"""HTTP conventions shared by every mqserve port, TorchServe's to the byte.

* Every response carries ``x-request-id`` and TorchServe's no-cache headers, and
  ``Connection: keep-alive`` below 400, ``Connection: close`` from 400 up.
* JSON is pretty-printed with a 2-space indent and followed by one ``\\n``.
* Errors are rendered here and nowhere else, as ``{"code", "type", "message"}``.
* Paths are split as Java's ``String.split("/")`` does: trailing empty segments drop.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import falcon
import falcon.asgi
import orjson
import redis

from control.core.errors import (
    InternalServerException,
    MethodNotAllowedException,
    ModelServerError,
    ResourceNotFoundException,
    ServiceUnavailableException,
)

log = logging.getLogger(__name__)

#: The message of the 503 every port answers while Redis cannot be reached.
REDIS_DOWN = "The model registry (Redis) is unavailable. Retry shortly."

NO_CACHE_HEADERS = {
    "Pragma": "no-cache",
    "Cache-Control": "no-cache; no-store, must-revalidate, private",
    "Expires": "Thu, 01 Jan 1970 00:00:00 UTC",
}


def dumps(value: Any) -> bytes:
    """Gson-style pretty JSON: 2-space indent, no HTML escaping, trailing newline."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n"


def send_json(resp: falcon.Response, value: Any, status: int = 200) -> None:
    """Answer ``value`` as pretty JSON with ``status``."""
    resp.status = status
    resp.content_type = "application/json"
    resp.data = dumps(value)


def send_status(resp: falcon.Response, status: int, message: str) -> None:
    """TorchServe's ``{"status": "..."}`` success body."""
    send_json(resp, {"status": message}, status)


def segments(path: str) -> list[str]:
    """Java ``path.split("/")``: keeps the leading empty segment, drops trailing empties."""
    parts = path.split("/")
    while parts and parts[-1] == "":
        parts.pop()
    return parts


class CommonHeaders:
    """Falcon middleware adding TorchServe's per-response headers (WSGI and ASGI).

    ``Connection: close`` from 400 up also makes the server close the socket:
    uvicorn honours the header an ASGI app sets (for the WSGI metrics port,
    :func:`close_on_error` asks gunicorn to).
    """

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, ok: bool
    ) -> None:
        resp.set_header("x-request-id", req.context.get("request_id") or str(uuid.uuid4()))
        for name, value in NO_CACHE_HEADERS.items():
            resp.set_header(name, value)
        code = resp.status_code
        resp.set_header("Connection", "close" if code >= 400 else "keep-alive")

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.request_id = str(uuid.uuid4())

    async def process_response_async(
        self, req: falcon.Request, resp: falcon.Response, resource: object, ok: bool
    ) -> None:
        self.process_response(req, resp, resource, ok)

    async def process_request_async(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.process_request(req, resp)


class RequestSizeLimit:
    """Refuse bodies over ``max_request_size`` with a bare 413, before any other work.

    Only a declared ``Content-Length`` can be refused here; a chunked body is bounded
    while it is read (:func:`read_body`).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.content_length is not None and req.content_length > self._limit:
            raise falcon.HTTPContentTooLarge()

    async def process_request_async(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.process_request(req, resp)


async def read_body(req: falcon.asgi.Request, limit: int) -> bytes:
    """The request body, at most ``limit`` (``max_request_size``) bytes.

    A longer one is a bare 413, as TorchServe answers it (``falcon.HTTPContentTooLarge``,
    which :func:`new_app` renders without a body): at once when ``Content-Length`` says
    so, else as soon as more than ``limit`` bytes have arrived, without reading the
    rest (a chunked body has no length; the server decodes its chunks). The body
    arrives as the client sends it: a slow client costs a suspended coroutine, never
    a thread.
    """
    if req.content_length is not None and req.content_length > limit:
        raise falcon.HTTPContentTooLarge()
    chunks: list[bytes] = []
    size = 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > limit:
            raise falcon.HTTPContentTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def render_error(req: falcon.Request, resp: falcon.Response, exc: ModelServerError) -> None:
    """The one renderer of error bodies."""
    resp.status = exc.status
    resp.content_type = "application/json"
    resp.data = dumps({"code": exc.status, "type": exc.type, "message": exc.message})


def _handle_model_error(
    req: falcon.Request, resp: falcon.Response, exc: ModelServerError, params: dict[str, Any]
) -> None:
    render_error(req, resp, exc)


def _handle_http_error(
    req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: dict[str, Any]
) -> None:
    # Only Falcon's own routing and media errors get here; map them to TorchServe's.
    if exc.status_code == 404:
        render_error(req, resp, ResourceNotFoundException())
    elif exc.status_code == 405:
        render_error(req, resp, MethodNotAllowedException())
    elif exc.status_code == 413:
        resp.status = 413
        resp.data = b""
    else:
        render_error(req, resp, InternalServerException(exc.title or "Error", exc.status_code))


def _handle_redis_down(
    req: falcon.Request, resp: falcon.Response, exc: redis.RedisError, params: dict[str, Any]
) -> None:
    # The registry is unreachable (Redis restarting, a network cut): the client may retry,
    # so this is a TorchServe-shaped 503, never a 500 with a stack trace.
    log.warning("Redis unavailable on %s %s: %s", req.method, req.path, exc)
    render_error(req, resp, ServiceUnavailableException(REDIS_DOWN))


def _handle_unexpected(
    req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]
) -> None:
    # Never leak a stack trace: log it, answer TorchServe's generic 500.
    log.exception("unhandled error on %s %s", req.method, req.path)
    render_error(req, resp, InternalServerException("Internal Server Error"))


def _add_error_handlers(app: Any, wrap: Callable[[Any], Any]) -> None:
    app.add_error_handler(Exception, wrap(_handle_unexpected))
    # Only an unreachable Redis (BusyLoadingError is a ConnectionError); a Redis error
    # about the data itself is a server bug: the generic 500 below.
    app.add_error_handler(redis.ConnectionError, wrap(_handle_redis_down))
    app.add_error_handler(redis.TimeoutError, wrap(_handle_redis_down))
    app.add_error_handler(falcon.HTTPError, wrap(_handle_http_error))
    app.add_error_handler(ModelServerError, wrap(_handle_model_error))


def _awaitable(handler: Callable[..., None]) -> Callable[..., Any]:
    """An ASGI app's error handlers are coroutines; these ones never block."""

    async def handle(req: Any, resp: Any, exc: Any, params: dict[str, Any], **_: Any) -> None:
        handler(req, resp, exc, params)

    return handle


def new_app(
    middleware: Iterable[Any],
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """An ASGI Falcon app (the inference and management ports) with TorchServe's
    headers and error bodies wired in. ``middleware`` must offer ASGI methods
    (``process_request_async`` etc., or ``async def process_request``)."""
    app = falcon.asgi.App(middleware=[CommonHeaders(), *middleware])
    _add_error_handlers(app, _awaitable)
    return app


def new_wsgi_app(middleware: Iterable[Any]) -> falcon.App[falcon.Request, falcon.Response]:
    """A WSGI Falcon app (the metrics port) with the same headers and error bodies."""
    app = falcon.App(middleware=[CommonHeaders(), *middleware])
    _add_error_handlers(app, lambda handler: handler)
    return app


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def close_on_error(app: WSGIApp) -> WSGIApp:
    """Make gunicorn close the connection after a response with status >= 400.

    WSGI forbids applications from setting hop-by-hop headers, and gunicorn drops the
    ``Connection`` header the app sets; TorchServe closes the socket after every error,
    so we ask gunicorn's response object (the ``start_response`` owner) to do so.
    """

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            owner = getattr(start_response, "__self__", None)
            force_close = getattr(owner, "force_close", None)
            if int(status[:3]) >= 400 and force_close is not None:
                force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped
