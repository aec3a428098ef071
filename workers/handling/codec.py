"""Request decoding and reply encoding, exactly as TorchServe's Python backend does them.

Decoding (``docs/torchserve-compat.md#request-to-handler-input``): ``application/json``
→ ``json.loads`` (raw bytes if that fails), ``text/*`` → UTF-8 ``str`` (raw bytes if
that fails), anything else → ``bytearray``. Encoding
(``docs/torchserve-compat.md#replies``): bytes raw, ``str`` UTF-8, ``torch.Tensor`` via
``torch.save``, anything else ``json.dumps(x, indent=2)``.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from workers.handling.context import RequestProcessor
from workers.handling.types import InferenceRequest, Parameter


def decode_value(parameter: Parameter) -> Any:
    """The value a handler sees for one parameter.

    Only the mime type counts (``; charset=...`` and case are ignored): TorchServe's
    frontend hands its backend the bare mime type and always decodes text as UTF-8.
    """
    mime = parameter.content_type.split(";", 1)[0].strip().lower()
    raw = bytearray(parameter.value)
    if mime == "application/json":
        try:
            return json.loads(parameter.value.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return raw
    if mime.startswith("text"):
        try:
            return parameter.value.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    return raw


def decode_request(request: InferenceRequest) -> tuple[RequestProcessor, dict[str, Any]]:
    """One request's processor (its headers) and its handler input ``{name: value}``.

    A parameter name seen twice keeps the last value. The request properties hold one
    ``{name: {"content-type": ...}}`` entry per parameter, then the HTTP headers, which
    win on a name clash (TorchServe's order).
    """
    data: dict[str, Any] = {}
    properties: dict[str, Any] = {}
    for parameter in request.parameters:
        data[parameter.name] = decode_value(parameter)
        properties[parameter.name] = {"content-type": parameter.content_type}
    properties.update(request.headers)
    return RequestProcessor(properties), data


def encode_output(value: Any) -> bytes:
    """The reply body for one element of a handler's output.

    Raises TypeError or ValueError when ``value`` is not JSON-serialisable.
    """
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    # Only a process that imported torch can hold a tensor; this keeps torch optional.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        return buffer.getvalue()
    return json.dumps(value, indent=2).encode("utf-8")


def split_content_type(headers: dict[str, Any]) -> tuple[dict[str, str], str | None]:
    """Separate the handler's response headers from its Content-Type.

    ``context.set_response_content_type`` stores the type as a ``content-type`` header;
    a handler may also have set it under another spelling. Values become strings.
    """
    plain: dict[str, str] = {}
    content_type: str | None = None
    for key, value in headers.items():
        name = str(key)
        if name.lower() == "content-type":
            if content_type is None or name == "content-type":
                content_type = str(value)
        else:
            plain[name] = str(value)
    return plain, content_type or None
