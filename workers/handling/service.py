"""A loaded model: runs one batch through the handler and shapes the replies.

Error mapping (``docs/torchserve-compat.md#inference-errors``), each failing the whole batch with a
:class:`HandlerFailure`:

* the handler raised ``MemoryError``, or an exception whose text contains ``CUDA``
  → 507 ``Out of resources``;
* it raised a ``PredictionException(message, error_code)`` → ``error_code`` ``message``;
* it raised anything else → 503 ``Prediction failed``;
* it returned a non-list → 503 ``Invalid model predict output``;
* the list length differs from the batch size → 503 ``number of batch response mismatched``;
* an element cannot be serialised → 503 ``Unsupported model output data type.``

Streaming (:mod:`workers.handling.streaming`): a batch handled with a ``reply_stream``
lets the handler send intermediate replies while it runs; the final reply of a request
that streamed carries ``ts_stream_next: false``. A handler that fails after pieces were
sent fails the batch as above (the final reply is the error).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from workers.handling.codec import decode_request, encode_output, split_content_type
from workers.handling.context import Context, RequestProcessor
from workers.handling.metrics import MetricRecord
from workers.handling.streaming import end_stream_header
from workers.handling.types import (
    HandlerFailure,
    InferenceReply,
    InferenceRequest,
    ReplyStream,
    StreamCancelled,
)

logger = logging.getLogger(__name__)

#: The handler entry point: ``fn(data, context)``.
EntryPoint = Callable[[Any, Context], Any]

PREDICTION_METRIC = "PredictionTime"
OUT_OF_RESOURCES = (507, "Out of resources")
PREDICTION_FAILED = (503, "Prediction failed")
INVALID_OUTPUT = (503, "Invalid model predict output")
LENGTH_MISMATCH = (503, "number of batch response mismatched")
UNSUPPORTED_OUTPUT = (503, "Unsupported model output data type.")


def is_describe(request: InferenceRequest) -> bool:
    """A describe call (``GET /models/{name}?customized=true``) rather than a prediction."""
    return request.headers.get("describe") == "True"


class LoadedModel:
    """A handler that :func:`~workers.handling.loader.load_handler` initialised.

    Not thread-safe: one batch at a time, as TorchServe's backend runs them.
    """

    def __init__(self, context: Context, entry_point: EntryPoint) -> None:
        self.context = context
        self._entry_point = entry_point
        #: Metrics the handler recorded while initialising.
        self.load_metrics: list[MetricRecord] = context.metrics.drain()
        #: Metrics of the latest :meth:`handle` call (``PredictionTime``, the handler's own).
        self.last_metrics: list[MetricRecord] = []

    @property
    def model_name(self) -> str:
        return self.context.model_name

    @property
    def entry_point(self) -> EntryPoint:
        """What runs per batch: the handler function, or the bound ``handle`` of its class."""
        return self._entry_point

    def handle(
        self, batch: list[InferenceRequest], stream: ReplyStream | None = None
    ) -> list[InferenceReply]:
        """One reply per request, in order; raises :class:`HandlerFailure` for the batch.

        A describe request is always a batch of one; its reply body is the handler's
        output. ``stream`` receives the intermediate replies the handler sends while it
        runs (``context.reply_stream``; None: they are dropped). Raises ValueError for
        an empty batch or a batched describe request.
        """
        if not batch:
            raise ValueError("a batch holds at least one request")
        if len(batch) > 1 and any(is_describe(request) for request in batch):
            raise ValueError("a describe request is never batched")
        decoded = [decode_request(request) for request in batch]
        processors = [processor for processor, _ in decoded]
        self.context.start_batch({i: r.request_id for i, r in enumerate(batch)}, processors, stream)
        try:
            output = self._predict([data for _, data in decoded])
            return _replies(output, processors)
        finally:
            self.context.end_batch()
            self.last_metrics = self.context.metrics.drain()

    def _predict(self, data: list[dict[str, Any]]) -> list[Any]:
        start = time.perf_counter()
        try:
            output = self._entry_point(data, self.context)
        except StreamCancelled as exc:
            # Every client of the batch went away mid-stream: the handler stopped
            # generating, as meant; its answer goes to nobody.
            logger.info("model %s: streaming batch cancelled by its clients", self.model_name)
            raise HandlerFailure(*PREDICTION_FAILED) from exc
        except Exception as exc:  # the handler is user code: anything may come out
            failure = _failure(exc)
            logger.warning(
                "model %s: handler failed (%s)", self.model_name, failure.message, exc_info=True
            )
            raise failure from exc
        if not isinstance(output, list):
            logger.warning("model %s: handler returned %s", self.model_name, type(output))
            raise HandlerFailure(*INVALID_OUTPUT)
        if len(output) != len(data):
            logger.warning(
                "model %s: %d outputs for %d requests", self.model_name, len(output), len(data)
            )
            raise HandlerFailure(*LENGTH_MISMATCH)
        elapsed_ms = round((time.perf_counter() - start) * 1000, 2)
        self.context.metrics.add_time(PREDICTION_METRIC, elapsed_ms)
        return output


def _failure(exc: Exception) -> HandlerFailure:
    """The batch failure a handler exception maps to (TorchServe's order of checks)."""
    if isinstance(exc, MemoryError):
        return HandlerFailure(*OUT_OF_RESOURCES)
    prediction = _prediction_error(exc)
    if prediction is not None:
        return HandlerFailure(*prediction)
    if "CUDA" in str(exc):
        return HandlerFailure(*OUT_OF_RESOURCES)
    return HandlerFailure(*PREDICTION_FAILED)


def _prediction_error(exc: Exception) -> tuple[int, str] | None:
    """``(error_code, message)`` of a ``PredictionException``, else None.

    Matched by class name so that the real TorchServe's ``ts.utils.util`` class counts
    as well as the compatibility layer's. A code outside 100..599 becomes 500.
    """
    if not any(cls.__name__ == "PredictionException" for cls in type(exc).__mro__):
        return None
    code = getattr(exc, "error_code", 500)
    if not isinstance(code, int) or isinstance(code, bool) or not 100 <= code <= 599:
        code = 500
    return code, str(getattr(exc, "message", exc))


def _replies(output: list[Any], processors: list[RequestProcessor]) -> list[InferenceReply]:
    try:
        bodies = [encode_output(value) for value in output]
    except (TypeError, ValueError, RecursionError) as exc:
        logger.warning("unable to serialise model output", exc_info=True)
        raise HandlerFailure(*UNSUPPORTED_OUTPUT) from exc
    replies = []
    for body, processor in zip(bodies, processors, strict=True):
        end_stream_header(processor.get_response_headers())
        headers, content_type = split_content_type(processor.get_response_headers())
        status = _status(processor.get_response_status_code())
        reason = processor.get_response_status_phrase() or ""
        replies.append(InferenceReply(status, str(reason), headers, content_type, body))
    return replies


def _status(code: Any) -> int:
    """The per-request status a handler set; a value that is no HTTP status fails the batch."""
    if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        return code
    logger.warning("handler set an invalid response status %r", code)
    raise HandlerFailure(*INVALID_OUTPUT)
