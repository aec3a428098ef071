"""The inference service of port 7070: ``Ping`` and ``Predictions`` over the HTTP data plane.

``Predictions`` builds the parts TorchServe builds from ``input``: one parameter per
key, its bytes the value, without a content type (as a multipart field without a
filename reaches the handler), so a handler reading ``data`` or ``body`` gets what an
HTTP client's form field of that name would give it. The request then takes the HTTP
inference port's path: :meth:`control.core.dispatch.Dispatcher.send` (one enqueue
script, this process's reply listener). Its answer is the handler's body as
``prediction`` (as TorchServe, whatever status the handler set); a handler or worker
error, a missing model or version, no worker and a full queue close the call with the
gRPC code of the HTTP status they have on port 8080 (:mod:`control.grpc.status`).

``StreamPredictions`` takes the same path through
:meth:`control.core.dispatch.Dispatcher.stream`: one message per piece the handler sends
with ``send_intermediate_predict_response``, then one for its return value; the request
runs as a batch of one. ``StreamPredictions2`` is bidirectional: each request it
receives is streamed back in turn, tagged with its ``sequence_id``; an error is reported
inside the stream (``status``), as TorchServe's, instead of closing the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import grpc.aio
import redis
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from control.core.dispatch import Delivery, Dispatcher, NoWorker, QueueFull
from control.core.envelope import Part, Reply
from control.core.errors import ModelServerError, ServiceUnavailableException
from control.core.settings import Settings
from control.grpc.protos import inference_pb2, inference_pb2_grpc
from control.grpc.status import answers_errors, grpc_code, redis_down, streams_errors
from control.http.common import dumps
from control.inference.api import Recorder, no_worker_message

Context = grpc.aio.ServicerContext[
    inference_pb2.PredictionsRequest, inference_pb2.PredictionResponse
]

#: The headers a gRPC request reaches the handler with (no HTTP headers to pass on).
GRPC_HEADERS = {"explain": "False", "url_path": ""}

#: ``ErrorInfo.domain`` of the errors reported inside a ``StreamPredictions2`` call.
ERROR_DOMAIN = "mqserve"


def request_parts(request: inference_pb2.PredictionsRequest) -> tuple[Part, ...]:
    """TorchServe's parameters from ``input``: one per key, in the client's order, with
    no content type (bytes for the handler)."""
    return tuple(Part(name, "", bytes(value)) for name, value in request.input.items())


class InferenceServicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """``InferenceAPIsService`` over one :class:`Dispatcher` (this process's) and the
    health rule of ``/ping`` (``health``, blocking: run in a thread). Answered
    predictions are counted in ``recorder`` as the HTTP port's are (requests, latency,
    queue time per model and version)."""

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

    async def Ping(
        self, request: object, context: grpc.aio.ServicerContext[object, object]
    ) -> inference_pb2.TorchServeHealthResponse:
        """``/ping``'s JSON text; Unhealthy is an answer too, not an error."""
        healthy = await asyncio.to_thread(self._health)
        text = dumps({"status": "Healthy" if healthy else "Unhealthy"}).decode().rstrip("\n")
        return inference_pb2.TorchServeHealthResponse(health=text)

    @answers_errors
    async def Predictions(
        self, request: inference_pb2.PredictionsRequest, context: Context
    ) -> inference_pb2.PredictionResponse:
        """One request through the HTTP data plane; the handler's body as ``prediction``.
        A handler that streams is answered with its first piece (TorchServe's unary call)."""
        started = time.monotonic()
        model, version = request.model_name, request.model_version or None
        with self._refusals(model, version):
            outcome = await self._dispatch.send(
                model, version, request_parts(request), dict(GRPC_HEADERS), uuid.uuid4().hex
            )
        await self._check(outcome.reply, context)
        self._record(model, version, started, outcome)
        return inference_pb2.PredictionResponse(prediction=outcome.reply.body)

    @streams_errors
    async def StreamPredictions(
        self, request: inference_pb2.PredictionsRequest, context: Context
    ) -> AsyncIterator[inference_pb2.PredictionResponse]:
        """One message per ``send_intermediate_predict_response`` piece, then one for the
        handler's return value; the request runs as a batch of one (kind ``stream``). A
        client that cancels closes the stream, which cancels the handler at its next
        piece (``control.core.dispatch``)."""
        started = time.monotonic()
        model, version = request.model_name, request.model_version or None
        replies = self._dispatch.stream(
            model, version, request_parts(request), dict(GRPC_HEADERS), uuid.uuid4().hex,
            kind="stream",
        )  # fmt: skip
        try:
            with self._refusals(model, version):
                outcome = await anext(replies)
            while True:
                await self._check(outcome.reply, context)
                yield inference_pb2.PredictionResponse(prediction=outcome.reply.body)
                if not outcome.reply.more:
                    self._record(model, version, started, outcome)
                    return
                outcome = await anext(replies)
        finally:
            await replies.aclose()

    @contextlib.contextmanager
    def _refusals(self, model: str, version: str | None) -> Iterator[None]:
        """The dispatcher's refusals as the HTTP port words them (503 or 429)."""
        try:
            yield
        except NoWorker:
            raise ServiceUnavailableException(no_worker_message(model, version)) from None
        except QueueFull:
            if self._settings.queue_full_status == 429:
                raise ServiceUnavailableException(
                    f'Model "{model}" is busy: its queue is full. Retry later.', 429
                ) from None
            raise ServiceUnavailableException(no_worker_message(model, version)) from None

    @staticmethod
    async def _check(reply: Reply, context: Context) -> None:
        if reply.error is not None:
            # The worker's words, as TorchServe's job error (no exception name appended).
            await context.abort(grpc_code(reply.status), reply.error)

    def _record(self, model: str, version: str | None, started: float, outcome: Delivery) -> None:
        if self._recorder is not None:
            elapsed_us = (time.monotonic() - started) * 1e6
            self._recorder.inference(
                model, version or "default", elapsed_us, outcome.queue_seconds * 1e6
            )

    async def StreamPredictions2(
        self,
        request_iterator: AsyncIterator[inference_pb2.PredictionsRequest],
        context: Context,
    ) -> AsyncIterator[inference_pb2.PredictionResponse]:
        """Bidirectional: each request of the call, in the order sent, streamed back as
        :meth:`StreamPredictions` does, every message carrying the request's
        ``sequence_id`` (also given to the handler as the ``ts_request_sequence_id``
        header). An error of one request is a message whose ``status`` is set (its code,
        its message and an ``ErrorInfo`` naming the exception) and the call goes on, as
        TorchServe's. Deviation: no sequence affinity; a sequence's requests may reach
        different workers of the model (docs/torchserve-compat.md)."""
        async for request in request_iterator:
            sequence = request.sequence_id if request.HasField("sequence_id") else None
            try:
                async for message in self._sequence_step(request, sequence):
                    yield message
            except ModelServerError as exc:
                yield _error_message(grpc_code(exc.status), exc.message, exc.type, sequence)
            except (redis.ConnectionError, redis.TimeoutError):
                down = redis_down()
                yield _error_message(grpc.StatusCode.UNAVAILABLE, down.message, down.type, sequence)

    async def _sequence_step(
        self, request: inference_pb2.PredictionsRequest, sequence: str | None
    ) -> AsyncIterator[inference_pb2.PredictionResponse]:
        """One request of a :meth:`StreamPredictions2` call: its pieces, then its final
        reply; a reply with an error ends it as an error message."""
        started = time.monotonic()
        model, version = request.model_name, request.model_version or None
        headers = dict(GRPC_HEADERS)
        if sequence is not None:
            headers["ts_request_sequence_id"] = sequence
        replies = self._dispatch.stream(
            model, version, request_parts(request), headers, uuid.uuid4().hex, kind="stream"
        )
        try:
            with self._refusals(model, version):
                outcome = await anext(replies)
            while True:
                reply = outcome.reply
                if reply.error is not None:
                    yield _error_message(
                        grpc_code(reply.status), reply.error, "InternalServerException", sequence
                    )
                    return
                yield inference_pb2.PredictionResponse(prediction=reply.body, sequence_id=sequence)
                if not reply.more:
                    self._record(model, version, started, outcome)
                    return
                outcome = await anext(replies)
        finally:
            await replies.aclose()


def _error_message(
    code: grpc.StatusCode, message: str, exception: str, sequence: str | None
) -> inference_pb2.PredictionResponse:
    """A ``PredictionResponse`` reporting an error inside a ``StreamPredictions2`` call:
    ``status`` with the gRPC code, the message and an ``ErrorInfo`` naming the exception."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=exception, domain=ERROR_DOMAIN))
    status = status_pb2.Status(code=code.value[0], message=message, details=[info])
    return inference_pb2.PredictionResponse(sequence_id=sequence, status=status)
