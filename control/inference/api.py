"""The inference API (port 8080): TorchServe's routes, request decoding and answers.

Routing mirrors TorchServe's ``InferenceRequestHandler`` (segment rules, KServe paths,
``url_path`` from extra segments). A request becomes one frame on its model version's
queue (:mod:`control.core.dispatch`); the worker's reply carries the handler's status,
headers, content type and raw body, which are sent back as they are.

The app is ASGI: a request waiting for its body or its reply is a suspended coroutine,
so slow or idle clients cost no thread. A model that is unknown is a 404 once the
body has been read (the enqueue script resolves the version: one round trip).

Streaming (TorchServe's HTTP streaming): when the first reply is an intermediate piece
(the handler called ``send_intermediate_predict_response``), the answer is chunked
(``Transfer-Encoding: chunked``, no Content-Length) with the status, headers and
Content-Type of that first piece (``ts_stream_next: true`` among them), one chunk per
piece as it arrives and one for the final reply, whose headers cannot be sent any
more. A client that disconnects ends the forwarding at once and cancels the stream
(the worker stops the handler at its next piece). An error after the head was sent
(the handler failed mid-stream, the worker died) cannot change the status: the
response ends after the pieces already sent, and the error is logged.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Protocol
from urllib.parse import parse_qs, parse_qsl

import falcon
import falcon.asgi

from control.core.dispatch import Delivery, Dispatcher, NoWorker, QueueFull
from control.core.envelope import Part, Reply
from control.core.errors import (
    BadRequestException,
    InternalServerException,
    ResourceNotFoundException,
    ServiceUnavailableException,
)
from control.core.settings import Settings
from control.http.common import new_app, read_body, segments, send_json
from control.http.openapi import load_description

log = logging.getLogger(__name__)

NO_WORKER = (
    "has no worker to serve inference request. Please use scale workers API to add "
    "workers. If this is a sequence inference, please check if it is closed, or expired; "
    "or exceeds maxSequenceJobQueueSize"
)


def no_worker_message(model: str, version: str | None) -> str:
    """TorchServe's 503 text, stray quote of the versioned form included."""
    if version is None:
        return f'Model "{model}" {NO_WORKER}'
    return f'Model "{model}" Version {version}" {NO_WORKER}'


Req = falcon.asgi.Request
Resp = falcon.asgi.Response


class Recorder(Protocol):
    """Where per-model inference metrics go (``control.metrics.recorder.MetricsRecorder``)."""

    def inference(
        self, model: str, version_label: str, latency_us: float, queue_us: float
    ) -> None: ...


class InferenceRoutes:
    """A Falcon sink answering TorchServe's inference paths."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        health: Callable[[], bool],
        recorder: Recorder | None = None,
    ) -> None:
        self._settings = settings
        self._dispatch = dispatcher
        self._health = health
        self._recorder = recorder

    async def __call__(self, req: Req, resp: Resp | None, **_: Any) -> None:
        assert resp is not None  # None only for WebSocket requests, which are not routed here
        segs = segments(req.path)
        head = segs[1] if len(segs) > 1 else ""
        if len(segs) <= 1 or head == "api-description":
            self._describe_api(req, resp, segs)
        elif head == "ping":
            # The health rule reads Redis synchronously (shared with the CLI): a thread.
            healthy = await asyncio.to_thread(self._health)
            send_json(
                resp, {"status": "Healthy" if healthy else "Unhealthy"}, 200 if healthy else 500
            )
        elif head in ("predictions", "explanations"):
            await self._predictions(req, resp, segs, explain=head == "explanations")
        elif head == "invocations" or (len(segs) == 4 and head == "models"):
            await self._invocations(req, resp, segs)
        elif len(segs) in (3, 4) and segs[-1] == "predict":
            await self._predict(req, resp, segs[1], segs[2] if len(segs) == 4 else None, query=True)
        elif (
            len(segs) == 4
            and head == "v1"
            and segs[2] == "models"
            and (":predict" in segs[3] or ":explain" in segs[3])
        ):
            await self._predict(
                req, resp, segs[3].split(":")[0], None, explain=":explain" in segs[3]
            )
        elif (
            len(segs) == 5
            and head == "v2"
            and segs[2] == "models"
            and (segs[4] in ("infer", "explain"))
        ):
            await self._predict(req, resp, segs[3], None, explain=segs[4] == "explain")
        else:
            raise ResourceNotFoundException()

    def _describe_api(self, req: Req, resp: Resp, segs: list[str]) -> None:
        if req.method == "OPTIONS" or (len(segs) > 1 and segs[1] == "api-description"):
            send_json(resp, load_description("inference"))
        else:
            raise ResourceNotFoundException()

    async def _predictions(self, req: Req, resp: Resp, segs: list[str], explain: bool) -> None:
        if len(segs) < 3:
            raise ResourceNotFoundException()
        model = segs[2]
        version = segs[3] if len(segs) >= 4 else None
        if req.method == "OPTIONS":
            await self._dispatch.lookup(model, version)
            description = load_description("inference")
            description["info"]["title"] = f"{description['info']['title']}: {model}"
            send_json(resp, description)
            return
        await self._predict(req, resp, model, version, explain=explain, url_path="/".join(segs[4:]))

    async def _invocations(self, req: Req, resp: Resp, segs: list[str]) -> None:
        if segs[1] == "models":  # /models/{model}/invoke
            if segs[3] != "invoke":
                raise ResourceNotFoundException()
            await self._predict(req, resp, segs[2], None, query=True)
            return
        query = parse_qs(req.query_string, keep_blank_values=True)
        name = (query.get("model_name") or [""])[0]
        if not name:
            raise BadRequestException("Parameter model_name is required.")
        await self._predict(req, resp, name, None, query=True)

    async def _predict(
        self,
        req: Req,
        resp: Resp,
        model: str,
        version: str | None,
        explain: bool = False,
        url_path: str = "",
        query: bool = False,
    ) -> None:
        started = time.monotonic()
        headers = {k.lower(): v for k, v in req.headers.items()}
        headers["explain"] = "True" if explain else "False"
        headers["url_path"] = url_path
        parts = await read_parts(req, self._settings.max_request_size, query)
        replies = self._dispatch.stream(model, version, parts, headers, req.context.request_id)
        try:
            outcome = await anext(replies)
        except NoWorker:
            raise ServiceUnavailableException(no_worker_message(model, version)) from None
        except QueueFull:
            self._queue_full(resp, model, version)
            return
        reply = outcome.reply
        if reply.more and reply.error is None:
            write_head(resp, reply)
            resp.stream = self._chunks(req, reply, replies, model, version, started)
            return
        await replies.aclose()
        if reply.error is not None:
            raise InternalServerException(reply.error, reply.status)
        write_reply(resp, reply)
        self._record(model, version, started, outcome)

    def _record(self, model: str, version: str | None, started: float, outcome: Delivery) -> None:
        if self._recorder is not None:
            elapsed_us = (time.monotonic() - started) * 1e6
            self._recorder.inference(
                model, version or "default", elapsed_us, outcome.queue_seconds * 1e6
            )

    async def _chunks(
        self,
        req: Req,
        first: Reply,
        replies: AsyncGenerator[Delivery, None],
        model: str,
        version: str | None,
        started: float,
    ) -> AsyncIterator[bytes]:
        """The body of a streamed answer: the first piece's, then one chunk per reply
        until the final one; ends early (cancelling the stream) when the client goes
        away, and after the pieces sent when the stream fails (logged)."""
        gone = _disconnect_watch(req)
        piece: asyncio.Task[Delivery] | None = None
        try:
            if first.body:  # an empty chunk would end a chunked body: skipped
                yield first.body
            while True:
                piece = asyncio.ensure_future(anext(replies))
                waited: set[asyncio.Future[Any]] = {piece} if gone is None else {piece, gone}
                await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
                if not piece.done():
                    log.info("stream %s: the client went away", req.context.request_id)
                    return
                try:
                    outcome = piece.result()
                except StopAsyncIteration:
                    return
                except Exception as exc:  # the worker died, no worker left, Redis away
                    log.warning("stream %s ended early: %s", req.context.request_id, exc)
                    return
                reply = outcome.reply
                if reply.error is not None:
                    # TorchServe defines no answer to an error once the head is out: the
                    # status cannot change, so the response ends with what was sent.
                    log.warning(
                        "stream %s: handler failed mid-stream (%s %s); ending the response",
                        req.context.request_id, reply.status, reply.error,
                    )  # fmt: skip
                    return
                if reply.body:
                    yield reply.body
                if not reply.more:
                    self._record(model, version, started, outcome)
                    return
        finally:
            for task in (piece, gone):
                if task is not None and not task.done():
                    task.cancel()
            if piece is not None:
                # The generator must not be running when it is closed.
                await asyncio.wait({piece})
            await replies.aclose()

    def _queue_full(self, resp: Resp, model: str, version: str | None) -> None:
        if self._settings.queue_full_status == 429:
            # Honest back-pressure for clients that asked for it: retry shortly.
            resp.set_header("Retry-After", "1")
            raise ServiceUnavailableException(
                f'Model "{model}" is busy: its queue is full. Retry later.', 429
            )
        raise ServiceUnavailableException(no_worker_message(model, version))


async def read_parts(req: Req, limit: int, with_query: bool) -> tuple[Part, ...]:
    """TorchServe's decoding: form fields as parameters, else the whole body as ``body``.

    Values reach the handler as the exact bytes the client sent, whatever they are:

    * query parameters (only when ``with_query``) and ``application/x-www-form-urlencoded``
      fields are percent-decoded straight to bytes (``%FF`` is the byte 0xFF, never a
      UTF-8 replacement character), without a content type;
    * ``multipart/form-data`` parts are read raw. As in TorchServe (Netty), a part
      without a filename is a plain field, passed without a content type, so the
      handler gets bytes even when the part says ``text/plain``; a part with a filename
      keeps its ``Content-Type`` (``text/plain`` when it has none: RFC 7578's default,
      where Netty says ``application/octet-stream``).

    Names are UTF-8: in the query and urlencoded forms invalid bytes become U+FFFD (as
    Netty decodes them); a multipart ``Content-Disposition`` that is not UTF-8 is a 400.
    A name repeated within the query or the form keeps its last value (the handler's
    dict keeps the last of repeated multipart parts too). At most ``limit + 1`` bytes
    of body are read, and a body longer than ``limit`` is a bare 413 before any parsing.
    """
    content_type = req.content_type or ""
    mime = content_type.split(";")[0].strip().lower()
    parts: list[Part] = []
    if with_query:  # only /invocations, /models/{m}/invoke and legacy /{m}/predict
        parts.extend(_form_fields(_wsgi_bytes(req.query_string)))
    body = await read_body(req, limit)
    if mime == "multipart/form-data":
        parts.extend(_multipart_fields(req, body, content_type))
    elif mime == "application/x-www-form-urlencoded":
        parts.extend(_form_fields(body))
    else:
        parts.append(Part("body", content_type, body))
    return tuple(parts)


def _wsgi_bytes(text: str) -> bytes:
    """The raw bytes of the query string: Falcon's ASGI request decodes the server's
    bytes as latin-1 (as PEP 3333 does), so encoding back yields them exactly."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:  # not from a server (e.g. a test client's str)
        return text.encode("utf-8")


def _form_fields(raw: bytes) -> list[Part]:
    """``a=1&b=%FF`` as one part per name (last value wins), values as raw bytes.

    Latin-1 maps the 256 byte values one-to-one onto the first 256 code points, so
    parsing the latin-1 text with a latin-1 percent-decoder and encoding the result
    back yields exactly the bytes that were percent-encoded (``parse_qsl`` on bytes
    cannot: it re-encodes its results as ASCII).
    """
    fields: dict[str, bytes] = {}
    text = raw.decode("latin-1")
    for name, value in parse_qsl(text, keep_blank_values=True, encoding="latin-1"):
        fields[name.encode("latin-1").decode("utf-8", "replace")] = value.encode("latin-1")
    return [Part(name, "", value) for name, value in fields.items()]


def _multipart_fields(req: Req, body: bytes, content_type: str) -> list[Part]:
    """The parts of a ``multipart/form-data`` body, raw, with TorchServe's content types.

    The body is already in memory (bounded by ``max_request_size``), so Falcon's
    synchronous multipart parser reads it from a buffer.
    """
    handler = falcon.media.MultipartFormHandler()
    parts = []
    for part in handler.deserialize(io.BytesIO(body), content_type, len(body)):
        try:
            name, filename = part.name or "", part.filename
        except UnicodeDecodeError:  # a Content-Disposition that is not UTF-8
            raise falcon.MediaMalformedError(falcon.MEDIA_MULTIPART) from None
        kind = part.content_type if filename is not None else ""
        parts.append(Part(name, kind, part.stream.read()))
    return parts


def write_reply(resp: Resp, reply: Reply) -> None:
    """The handler's status, headers, content type (only if set) and raw body."""
    write_head(resp, reply)
    resp.data = reply.body


def write_head(resp: Resp, reply: Reply) -> None:
    """The handler's status, headers and content type (only if set)."""
    resp.status = f"{reply.status} {reply.reason}" if reply.reason else reply.status
    for name, value in reply.headers.items():
        resp.set_header(name, value)
    resp.content_type = reply.content_type


def _disconnect_watch(req: Req) -> asyncio.Task[None] | None:
    """A task that ends when the client disconnects; None where that cannot be seen.

    Once the body has been read (it has, before any reply), the ASGI ``receive`` only
    ever answers ``http.disconnect``, when the client goes. Falcon streams a body
    without watching for it (an ASGI server's ``send`` is a silent no-op on a closed
    connection), so the watch reads the request's ``receive``, which Falcon 4 keeps as
    ``Request._receive`` (no public accessor; absent: no watch, the stream runs to its
    end unread).
    """
    receive = getattr(req, "_receive", None)
    if receive is None:
        return None

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return asyncio.ensure_future(watch())


class _StopListener:
    """ASGI lifespan: stop the dispatcher's reply listener when the server shuts down
    (after in-flight requests have been answered), so no task is left pending."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def process_shutdown(self, scope: dict[str, Any], event: dict[str, Any]) -> None:
        await self._dispatcher.close()


def create_inference_app(
    settings: Settings,
    dispatcher: Dispatcher,
    health: Callable[[], bool],
    middleware: list[Any],
    recorder: Recorder | None = None,
) -> falcon.asgi.App[Req, Resp]:
    """The ASGI app of port 8080; ``middleware`` carries token auth and counters."""
    app = new_app([*middleware, _StopListener(dispatcher)])
    # TorchServe sets no Content-Type on predictions unless the handler does.
    app.resp_options.default_media_type = None  # type: ignore[assignment]
    app.add_sink(InferenceRoutes(settings, dispatcher, health, recorder), prefix="/")
    return app
