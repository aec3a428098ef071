"""The JSON shape of inference requests and replies on the model queues.

A queue message carries one request: its id, headers and parameters. Parameter values
and reply bodies are bytes; JSON carries them as base64 text (``b64``) or, when they are
valid UTF-8 text, as plain strings (``text``), which keeps JSON payloads readable and
small.

Messages come from anyone who can write to a queue (Celery clients send
``mqserve.predict`` directly), so :func:`parse_request` checks every field and raises
:class:`MessageError`, and only that, for anything else: the task answers it with
:func:`failure_message` (400) instead of failing.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from workers.handling.types import InferenceReply, InferenceRequest, Parameter


class MessageError(ValueError):
    """A queue message that is not a request of the shape :func:`request_message` makes."""


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


def request_message(request: InferenceRequest) -> dict[str, Any]:
    """The JSON-ready message for ``request``."""
    return {
        "id": request.request_id,
        "headers": dict(request.headers),
        "params": [
            {"name": p.name, "content_type": p.content_type, **_pack(bytes(p.value))}
            for p in request.parameters
        ],
    }


def parse_request(message: Any) -> InferenceRequest:
    """Inverse of :func:`request_message`; raises :class:`MessageError`, and only that,
    for anything else (any JSON value may arrive)."""
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
    """The JSON-ready result for ``reply``."""
    return {
        "status": reply.status,
        "reason": reply.reason,
        "headers": dict(reply.headers),
        "content_type": reply.content_type,
        **_pack(reply.body),
    }


def parse_reply(message: dict[str, Any]) -> InferenceReply:
    """Inverse of :func:`reply_message`."""
    return InferenceReply(
        status=int(message["status"]),
        reason=str(message.get("reason", "")),
        headers={str(k): str(v) for k, v in message.get("headers", {}).items()},
        content_type=message.get("content_type"),
        body=_unpack(message),
    )


def failure_message(status: int, message: str) -> dict[str, Any]:
    """A batch-level failure (TorchServe's ``Prediction failed`` and friends)."""
    return {"status": status, "error": message}
