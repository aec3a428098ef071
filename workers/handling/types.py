"""The values a worker passes into and gets out of a loaded model.

These mirror what TorchServe's frontend sends its Python backend for one inference
request (``docs/torchserve-compat.md#request-to-handler-input``) and what it reads back per
request (``docs/torchserve-compat.md#replies``).

They are what a handler sees whichever path brought the request: an online frame
(``control.core.envelope``) or a Celery ``mqserve.predict`` message; ``workers.worker.messages``
converts each wire format to and from them, once each way. Batch-job chunks build them
from the job's stored items (``workers.worker.batch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from control.core.envelope import Part

#: One input of a request: a form field, a file part, or the whole body (``body``), with
#: the part's or request's mime type as the client sent it ("" when none). The very type
#: the online frames carry (``control.core.envelope.Part``), so that the HTTP layer, the
#: queues and the handler share one model of an input; the name is TorchServe's.
Parameter = Part


@dataclass(frozen=True)
class InferenceRequest:
    """One request of a batch.

    ``headers`` has lowercased names (last value wins) and includes the synthetic
    ``explain`` (``"True"``/``"False"``) and ``url_path`` entries, and ``describe``
    (``"True"``) for a describe call.
    """

    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    parameters: list[Parameter] = field(default_factory=list)


@dataclass(frozen=True)
class InferenceReply:
    """The answer to one request of a successfully handled batch.

    ``reason`` is the phrase the handler set, ``""`` meaning "the standard phrase for
    ``status``". ``content_type`` is ``None`` unless the handler set one, and
    ``headers`` never holds a Content-Type entry.
    """

    status: int
    reason: str
    headers: dict[str, str]
    content_type: str | None
    body: bytes


class HandlerFailure(Exception):
    """The batch failed as a whole: every request of it is answered ``status``/``message``.

    The handler's own exception, if any, is the ``__cause__``.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class ReplyStream(Protocol):
    """Where a batch's intermediate replies go while its handler runs (the worker's
    Redis sink, ``workers.worker.serving.BatchStream``), pushed at once, in call order.

    The handler reaches it through its context (``Context.reply_stream``, set for each
    batch of the online path only), via ``send_intermediate_predict_response``.
    """

    def pieces(self, replies: dict[str, InferenceReply]) -> None:
        """Send one intermediate reply per request id (more replies follow).

        Raises :class:`StreamCancelled` when every client of the batch has gone away;
        requests whose client went away get no piece.
        """
        ...

    def fail(self, request_ids: list[str], status: int, message: str) -> None:
        """End the streams of ``request_ids`` with a batch-level error (the answer is
        ``status`` ``message``); later pieces and their final replies go nowhere."""
        ...


class StreamCancelled(Exception):
    """Every client of a streaming batch went away: raised out of
    ``send_intermediate_predict_response`` so that the handler stops generating."""
