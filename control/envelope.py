"""Frames for online requests and replies: a JSON header, then the raw bytes.

A frame is ``len(header) as 4 bytes big-endian | header (JSON, UTF-8) | payload``. The
header describes the payload (its parts and their sizes); the payload is never
base64-encoded, so a 1 MB image costs 1 MB in Redis, not 1.33 MB, and JSON is the only
format ever parsed (no pickle). Frames are the values of the request, in-flight and
reply lists of :mod:`control.keys`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

_LEN = struct.Struct(">I")
#: Largest header accepted; a header is metadata, not data.
MAX_HEADER = 1024 * 1024


class FrameError(ValueError):
    """A frame is truncated or its header is not what it claims."""


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Frame ``header`` (JSON-serialisable) and ``payload``."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(head)) + head + payload


def unpack(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`pack`."""
    if len(frame) < _LEN.size:
        raise FrameError("frame too short")
    (size,) = _LEN.unpack_from(frame)
    if size > MAX_HEADER or _LEN.size + size > len(frame):
        raise FrameError("frame header length out of range")
    try:
        header = json.loads(frame[_LEN.size : _LEN.size + size])
    except ValueError as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header, frame[_LEN.size + size :]


@dataclass(frozen=True)
class Part:
    """One request parameter: TorchServe's ``body`` or a form field."""

    name: str
    content_type: str
    value: bytes


@dataclass(frozen=True)
class Request:
    """An online request as it travels through the queue."""

    id: str
    model: str
    version: str
    #: Wall-clock seconds after which nobody waits for the answer: it is not run.
    deadline: float
    enqueued: float
    headers: dict[str, str] = field(default_factory=dict)
    parts: tuple[Part, ...] = ()
    #: ``predict`` or ``describe`` (customized metadata, always a batch of one).
    kind: str = "predict"

    def frame(self) -> bytes:
        header = {
            "id": self.id, "model": self.model, "version": self.version,
            "deadline": self.deadline, "enqueued": self.enqueued, "headers": self.headers,
            "kind": self.kind,
            "parts": [[p.name, p.content_type, len(p.value)] for p in self.parts],
        }  # fmt: skip
        return pack(header, b"".join(p.value for p in self.parts))

    @classmethod
    def parse(cls, frame: bytes) -> Request:
        header, payload = unpack(frame)
        try:
            parts: list[Part] = []
            offset = 0
            for name, content_type, size in header["parts"]:
                parts.append(Part(str(name), str(content_type), payload[offset : offset + size]))
                offset += int(size)
            if offset != len(payload):
                raise FrameError("payload size does not match the header")
            return cls(
                id=str(header["id"]), model=str(header["model"]),
                version=str(header["version"]), deadline=float(header["deadline"]),
                enqueued=float(header["enqueued"]),
                headers={str(k): str(v) for k, v in header["headers"].items()},
                parts=tuple(parts), kind=str(header.get("kind", "predict")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed request frame: {exc}") from exc


@dataclass(frozen=True)
class Reply:
    """A worker's answer to one request."""

    status: int
    body: bytes = b""
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    #: Set when the request failed as a whole: TorchServe's error message.
    error: str | None = None
    #: Wall-clock seconds when a worker took the request (queue latency).
    dequeued: float = 0.0

    def frame(self) -> bytes:
        header = {
            "status": self.status, "reason": self.reason, "headers": self.headers,
            "content_type": self.content_type, "error": self.error, "dequeued": self.dequeued,
        }  # fmt: skip
        return pack(header, self.body)

    @classmethod
    def parse(cls, frame: bytes) -> Reply:
        header, body = unpack(frame)
        try:
            return cls(
                status=int(header["status"]), body=body, reason=str(header.get("reason", "")),
                headers={str(k): str(v) for k, v in header.get("headers", {}).items()},
                content_type=header.get("content_type"), error=header.get("error"),
                dequeued=float(header.get("dequeued", 0.0)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(f"malformed reply frame: {exc}") from exc
