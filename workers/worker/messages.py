"""The wire formats of the worker's two request paths, and the one conversion each way
between each of them and the handler's types (:mod:`workers.handling.types`).

* The ONLINE path (HTTP predictions and describe): ``control.core.envelope`` frames on the
  model version's online queue, answered by a reply frame on the request's reply list.
  :func:`to_inference_request` turns a :class:`~control.core.envelope.Request` into the
  handler's :class:`InferenceRequest`, :func:`to_reply` the handler's
  :class:`InferenceReply` into a :class:`~control.core.envelope.Reply`.
* The CELERY path (``mqserve.predict`` tasks on the model version's batch queue, which
  any Celery client may send): JSON, since that is what Celery carries.
  :func:`parse_request` turns a message into an :class:`InferenceRequest`,
  :func:`reply_message` an :class:`InferenceReply` into the task's JSON result.

(Batch-job chunks travel on the batch queue too, but their task names only the job and
an item range; inputs and results live in the job's Redis hashes: ``workers.worker.batch``.)

A ``mqserve.predict`` message::

    {"id": "r1", "headers": {"X-Trace": "t"},
     "params": [{"name": "body", "content_type": "application/json", "text": "[1, 2]"},
                {"name": "image", "content_type": "image/png", "b64": "iVBORw0KGgo="}]}

``id`` is a string (an integer is read as its decimal text); ``headers`` (names are
lowercased) and ``params`` may be absent, and so may a parameter's ``content_type``
(``""``). A value is ``text`` (UTF-8 text) or ``b64`` (base64 of the raw bytes). The
result is ``{"status", "reason", "headers", "content_type"}`` with the body packed the
same way (``text`` when it is valid UTF-8, which keeps JSON replies readable and small,
else ``b64``), or :func:`failure_message`'s ``{"status", "error"}`` when the batch failed
as a whole.

Messages come from anyone who can write to a queue, so :func:`parse_request` checks
every field and raises :class:`MessageError`, and only that, for anything else: the task
answers it with :func:`failure_message` (400) instead of failing.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from control.core.envelope import Reply, Request
from workers.handling.types import InferenceReply, InferenceRequest, Parameter


class MessageError(ValueError):
    """A queue message that is not a ``mqserve.predict`` request (see the module docstring)."""


def _pack(data: bytes) -> dict[str, str]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def _unpack(packed: dict[str, Any]) -> bytes:
    if "text" in packed:
        text = packed["text"]
        if not isinstance(text, str):
            raise MessageError("'text' is not a string")
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON may carry lone surrogates
            raise MessageError(f"'text' is not valid Unicode: {exc}") from exc
    data = packed.get("b64")
    if not isinstance(data, str):
        raise MessageError("a value needs 'text' or 'b64' (a string)")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(f"'b64' is not base64: {exc}") from exc


def _strings(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise MessageError(f"{what} is not an object of strings")
    return value


def _parameter(value: Any) -> Parameter:
    if not isinstance(value, dict):
        raise MessageError("a parameter is not an object")
    name, content_type = value.get("name"), value.get("content_type", "")
    if not isinstance(name, str) or not isinstance(content_type, str):
        raise MessageError("a parameter's name and content_type must be strings")
    return Parameter(name, content_type, _unpack(value))


def parse_request(message: Any) -> InferenceRequest:
    """The handler's view of a ``mqserve.predict`` message; raises :class:`MessageError`,
    and only that, for anything else (any JSON value may arrive)."""
    if not isinstance(message, dict):
        raise MessageError("the message is not an object")
    rid = message.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise MessageError("'id' is missing or not a string")
    headers = _strings(message.get("headers", {}), "'headers'")
    params = message.get("params", [])
    if not isinstance(params, list):
        raise MessageError("'params' is not a list")
    return InferenceRequest(
        request_id=str(rid),
        headers={k.lower(): v for k, v in headers.items()},
        parameters=[_parameter(p) for p in params],
    )


def reply_message(reply: InferenceReply) -> dict[str, Any]:
    """The task's JSON-ready result for ``reply``."""
    return {
        "status": reply.status,
        "reason": reply.reason,
        "headers": dict(reply.headers),
        "content_type": reply.content_type,
        **_pack(reply.body),
    }


def failure_message(status: int, message: str) -> dict[str, Any]:
    """A batch-level failure (TorchServe's ``Prediction failed`` and friends)."""
    return {"status": status, "error": message}


def to_inference_request(request: Request) -> InferenceRequest:
    """The handler's view of an online request frame: its parts are the parameters, and a
    describe request carries the header ``describe: True`` (as in TorchServe); a
    ``stream`` request is a prediction like any other to the handler."""
    headers = dict(request.headers)
    if request.kind == "describe":
        headers["describe"] = "True"
    return InferenceRequest(request_id=request.id, headers=headers, parameters=list(request.parts))


def to_reply(reply: InferenceReply, dequeued: float, more: bool = False) -> Reply:
    """The reply frame for the handler's ``reply`` to a request taken at ``dequeued``;
    ``more``: an intermediate piece of a streamed answer (``Reply.more``)."""
    return Reply(
        status=reply.status,
        body=reply.body,
        reason=reply.reason,
        headers=dict(reply.headers),
        content_type=reply.content_type,
        dequeued=dequeued,
        more=more,
    )
