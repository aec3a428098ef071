"""TorchServe's ``send_intermediate_predict_response``: streamed replies from a handler.

A handler streams by calling :func:`send_intermediate_predict_response` once per
intermediate result while it handles a batch, then returning the final result as usual.
Each call sends at once, through the batch's :class:`~workers.handling.types.ReplyStream`
(``context.reply_stream``, which the worker sets for every batch of the online path),
one reply per request of ``req_id_map``:

* serialised as the final reply is (:func:`~workers.handling.codec.encode_output`), with
  the request's status, reason phrase, Content-Type and headers as the handler set them
  on the context, plus ``ts_stream_next: true`` (set on the context, as TorchServe does,
  so the final reply of a request that streamed says ``ts_stream_next: false``:
  ``workers.handling.service``);
* with a ``code`` other than 200, every request of ``req_id_map`` is answered
  ``code``/``message`` instead and its stream ends (TorchServe answers a non-200 batch
  status with an error for every request and forgets them).

Outside a streaming-capable batch (a batch job, a Celery ``mqserve.predict`` task,
``initialize``) the pieces have no client to go to: they are dropped (logged once per
context) and the final reply is the answer. When every client of the batch has gone
away the call raises :class:`~workers.handling.types.StreamCancelled`, so that a
generating handler stops; a handler that catches it and returns is answered to nobody.
"""

from __future__ import annotations

import logging
from typing import Any

from workers.handling.codec import encode_output, split_content_type
from workers.handling.context import Context
from workers.handling.types import InferenceReply

log = logging.getLogger(__name__)

#: The response header marking a piece (``true``) or a streamed answer's end (``false``).
STREAM_NEXT = "ts_stream_next"
_warned: set[int] = set()


def send_intermediate_predict_response(
    ret: list[Any],
    req_id_map: dict[int, str],
    message: str,
    code: int,
    context: Context | None = None,
) -> None:
    """Send ``ret[idx]`` to request ``req_id_map[idx]`` now, for every ``idx`` of the map.

    ``ret`` is a list like a handler's return value (one element per request of the
    batch); ``req_id_map`` is ``context.request_ids``; ``message`` and ``code`` are the
    batch status (``"Intermediate Prediction success"``, 200). See the module doc for
    what is sent, and when nothing is. Raises what serialising an element raises
    (TypeError, ValueError) and ``StreamCancelled``.
    """
    stream = getattr(context, "reply_stream", None)
    if context is None or stream is None:
        key = id(context)
        if key not in _warned:
            _warned.add(key)
            log.warning("intermediate predict response outside a streaming request: dropped")
        return
    if code != 200:
        stream.fail(list(req_id_map.values()), int(code), str(message))
        return
    pieces: dict[str, InferenceReply] = {}
    for idx, request_id in req_id_map.items():
        context.set_response_header(idx, STREAM_NEXT, "true")
        headers, content_type = split_content_type(context.get_response_headers(idx))
        status, phrase = context.get_response_status(idx)
        pieces[request_id] = InferenceReply(
            status, phrase or "", headers, content_type, encode_output(ret[idx])
        )
    stream.pieces(pieces)


def end_stream_header(headers: dict[str, Any]) -> None:
    """Mark the final reply of a request that streamed: ``ts_stream_next`` ``true``
    becomes ``false`` (TorchServe's ``create_predict_response``); others are untouched."""
    if headers.get(STREAM_NEXT) == "true":
        headers[STREAM_NEXT] = "false"
