"""Frames for online requests and replies: a JSON header, then the raw bytes.

A frame is ``len(header) as 4 bytes big-endian | header (JSON, UTF-8) | payload``. The
header describes the payload (its parts and their sizes); the payload is never
base64-encoded, so a 1 MB image costs 1 MB in Redis, not 1.33 MB, and JSON is the only
format ever parsed (no pickle). Frames are the values of the request, in-flight and
reply lists of :mod:`control.core.keys`.

This is the wire format of the ONLINE path only (HTTP predictions and describe, from
the API to a worker and back); the Celery path (``mqserve.predict`` tasks) carries JSON
(``workers.worker.messages``). A :class:`Part` is the one model of a request input on every
path: the handler's ``workers.handling.types.Parameter`` is this class, and
``workers.worker.messages`` holds the one conversion each way between a :class:`Request` or
:class:`Reply` and the handler's types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

from control.core import keys

_LEN = struct.Struct(">I")
#: Largest header accepted; a header is metadata, not data.
MAX_HEADER = 1024 * 1024
#: What a request asks of a worker: a prediction, customized metadata (describe), or a
#: prediction its caller streams and wants run alone (``stream``: gRPC
#: ``StreamPredictions``). ``describe`` and ``stream`` requests are batches of one.
KINDS = ("predict", "describe", "stream")
#: The kinds a worker never batches with another request.
SOLO_KINDS = frozenset({"describe", "stream"})


class FrameError(ValueError):
    """A frame is truncated or its header is not what it claims."""


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """Frame ``header`` (JSON-serialisable) and ``payload``."""
    # orjson: compact, and several times faster than json on the request path; json
    # for what orjson refuses (integers past 64 bits: only in frames built to be bad).
    try:
        head = orjson.dumps(header)
    except TypeError:
        head = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(head)) + head + payload


def unpack(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of :func:`pack`; raises :class:`FrameError` for anything that is not a frame."""
    if not isinstance(frame, bytes | bytearray):
        raise FrameError("a frame is bytes")
    if len(frame) < _LEN.size:
        raise FrameError("frame too short")
    (size,) = _LEN.unpack_from(frame)
    if size > MAX_HEADER or _LEN.size + size > len(frame):
        raise FrameError("frame header length out of range")
    try:
        header = orjson.loads(frame[_LEN.size : _LEN.size + size])
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise FrameError(f"frame header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header, frame[_LEN.size + size :]


@dataclass(frozen=True)
class Part:
    """One request parameter: TorchServe's ``body``, a form field or a file part, with
    its mime type as the client sent it (``""`` when none)."""

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
    #: ``predict``, ``describe`` (customized metadata) or ``stream`` (a prediction run
    #: as a batch of one, :data:`SOLO_KINDS`).
    kind: str = "predict"
    #: The reply list to answer on (an API process's shared list, ``keys.replies``);
    #: ``""``: the request's own list, ``keys.reply(id)``. See :func:`reply_address`.
    reply_to: str = ""

    def frame(self) -> bytes:
        header = {
            "id": self.id, "model": self.model, "version": self.version,
            "deadline": self.deadline, "enqueued": self.enqueued, "headers": self.headers,
            "kind": self.kind,
            "parts": [[p.name, p.content_type, len(p.value)] for p in self.parts],
        }  # fmt: skip
        if self.reply_to:
            header["reply_to"] = self.reply_to
        return pack(header, b"".join(p.value for p in self.parts))

    @property
    def reply_key(self) -> str:
        """The list this request's reply goes to."""
        return self.reply_to or keys.reply(self.id)

    @classmethod
    def parse(cls, frame: bytes) -> Request:
        """Inverse of :meth:`frame`; raises :class:`FrameError`, and only that, for any
        frame that is not one (wrong types included: every field is checked)."""
        header, payload = unpack(frame)
        try:
            parts: list[Part] = []
            offset = 0
            entries = header["parts"]
            if not isinstance(entries, list):
                raise FrameError("parts is not a list")
            for entry in entries:
                if not isinstance(entry, list) or len(entry) != 3:
                    raise FrameError("a part is not [name, content type, size]")
                name, content_type, size = entry
                size = _count(size, "part size")
                parts.append(
                    Part(
                        _text(name, "part name"),
                        _text(content_type, "content type"),
                        payload[offset : offset + size],
                    )
                )
                offset += size
            if offset != len(payload):
                raise FrameError("payload size does not match the header")
            kind = _text(header.get("kind", "predict"), "kind")
            if kind not in KINDS:
                raise FrameError(f"unknown request kind {kind!r}")
            return cls(
                id=request_id(header), model=_text(header["model"], "model"),
                version=_text(header["version"], "version"),
                deadline=_number(header["deadline"], "deadline"),
                enqueued=_number(header["enqueued"], "enqueued"),
                headers=_headers(header["headers"]), parts=tuple(parts), kind=kind,
                reply_to=_reply_to(header),
            )  # fmt: skip
        except KeyError as exc:
            raise FrameError(f"malformed request frame: {exc} is missing") from exc


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
    #: The request answered: how a listener of a shared reply list routes it (first
    #: in the header, so :func:`answers` can tell without parsing). ``""`` on a
    #: request's own list.
    id: str = ""
    #: An intermediate piece of a streamed answer (the handler's
    #: ``send_intermediate_predict_response``): more replies to the same request follow,
    #: the last of them with ``more`` False. In the frame only when True, so frames
    #: without it (every non-streamed reply, and those of older workers) are final.
    more: bool = False

    def frame(self) -> bytes:
        header: dict[str, Any] = {"id": self.id} if self.id else {}
        header |= {
            "status": self.status, "reason": self.reason, "headers": self.headers,
            "content_type": self.content_type, "error": self.error, "dequeued": self.dequeued,
        }  # fmt: skip
        if self.more:
            header["more"] = True
        return pack(header, self.body)

    @classmethod
    def parse(cls, frame: bytes) -> Reply:
        """Inverse of :meth:`frame`; raises :class:`FrameError`, and only that, for any
        frame that is not one."""
        header, body = unpack(frame)
        try:
            status = header["status"]
        except KeyError as exc:
            raise FrameError("malformed reply frame: 'status' is missing") from exc
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise FrameError(f"reply status {status!r} is not an HTTP status")
        content_type, error = header.get("content_type"), header.get("error")
        more = header.get("more", False)
        if not isinstance(more, bool):
            raise FrameError("more is not a boolean")
        return cls(
            status=status, body=body, reason=_text(header.get("reason", ""), "reason"),
            headers=_headers(header.get("headers", {})),
            content_type=None if content_type is None else _text(content_type, "content type"),
            error=None if error is None else _text(error, "error"),
            dequeued=_number(header.get("dequeued", 0.0), "dequeued"),
            id=_text(header.get("id", ""), "id"), more=more,
        )  # fmt: skip

    def to(self, request_id: str) -> Reply:
        """This reply addressed to ``request_id`` (for a shared reply list)."""
        return dataclasses.replace(self, id=request_id)


def request_id(header: dict[str, Any]) -> str:
    """The request id a header names: a non-empty string; else :class:`FrameError`."""
    value = header.get("id")
    if not isinstance(value, str) or not value:
        raise FrameError("the request id is missing or not a string")
    return value


def answers(reply_frame: bytes, request_id: str) -> bool:
    """Whether ``reply_frame`` (as :meth:`Reply.frame` makes it) answers ``request_id``.

    Cheap: a reply header begins with its id. The liveness check of a waiting request
    (``control.core.dispatch``) does the same test in Lua over a shared reply list.
    """
    return reply_frame[_LEN.size :].startswith(reply_prefix(request_id))


def reply_prefix(request_id: str) -> bytes:
    """How the header of a reply to ``request_id`` begins."""
    return b'{"id":' + orjson.dumps(request_id)


def reply_address(frame: bytes) -> tuple[str, str] | None:
    """``(request id, reply list)`` of a request frame that may not parse, when its
    header still names an id; None when not even the id can be read.

    Lets a worker or supervisor answer a malformed or orphaned frame instead of leaving
    its sender to wait. A ``reply_to`` that is not a reply list (``keys.REPLY_PREFIX``)
    is ignored: a frame can never direct a write to any other key.
    """
    try:
        header = unpack(frame)[0]
        rid = request_id(header)
    except FrameError:
        return None
    try:
        target = _reply_to(header)
    except FrameError:
        target = ""
    return rid, target or keys.reply(rid)


def _reply_to(header: dict[str, Any]) -> str:
    value = header.get("reply_to", "")
    if not isinstance(value, str) or (value and not value.startswith(keys.REPLY_PREFIX)):
        raise FrameError("reply_to is not a reply list")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise FrameError(f"{what} is not a string")
    return value


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FrameError(f"{what} is not a non-negative integer")
    return value


def _number(value: Any, what: str) -> float:
    # bool is an int to Python, never a time; inf/nan and huge ints are no times either.
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise FrameError(f"{what} is not a number")
    try:
        number = float(value)
    except OverflowError as exc:
        raise FrameError(f"{what} is out of range") from exc
    if not math.isfinite(number):
        raise FrameError(f"{what} is not finite")
    return number


def _headers(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise FrameError("headers are not an object of strings")
    return dict(value)
