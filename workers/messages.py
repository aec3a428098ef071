"""The JSON shape of inference requests and replies on the model queues.

A queue message carries one request: its id, headers and parameters. Parameter values
and reply bodies are bytes; JSON carries them as base64 text (``b64``) or, when they are
valid UTF-8 text, as plain strings (``text``), which keeps JSON payloads readable and
small.
"""

from __future__ import annotations

import base64
from typing import Any

from workers.handling.types import InferenceReply, InferenceRequest, Parameter


def _pack(data: bytes) -> dict[str, str]:
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(data).decode("ascii")}


def _unpack(packed: dict[str, Any]) -> bytes:
    if "text" in packed:
        return str(packed["text"]).encode("utf-8")
    return base64.b64decode(packed["b64"])


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


def parse_request(message: dict[str, Any]) -> InferenceRequest:
    """Inverse of :func:`request_message`; raises ``KeyError``/``ValueError`` if malformed."""
    return InferenceRequest(
        request_id=str(message["id"]),
        headers={str(k).lower(): str(v) for k, v in message.get("headers", {}).items()},
        parameters=[
            Parameter(str(p["name"]), str(p.get("content_type", "")), _unpack(p))
            for p in message.get("params", [])
        ],
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
