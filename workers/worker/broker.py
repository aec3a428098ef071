"""kombu's Redis transport for model workers, minus the crash on garbage.

kombu's Redis transport pops a queue entry and decodes it as its JSON envelope before
Celery sees it; an entry that is not JSON (a raw ``LPUSH`` of anything onto
``mqs.q.<model>.<version>``), or JSON that is not an envelope, or an envelope whose
body is not base64, raises out of the consumer and Celery stops the worker
("Unrecoverable error"). This transport logs such an entry and drops it (it was
already popped; no sender can be told, as it names no reply address), so the worker
goes on consuming. Entries that are envelopes but not valid tasks are left to Celery,
which logs and acknowledges them, and the tasks themselves validate their arguments
(``workers.worker.tasks``).

:func:`guard` switches a Celery app to it: kombu picks transports by URL scheme, so
the transport is registered under :data:`SCHEME` and the app's broker URL rewritten
(``redis://`` and ``redis+socket://`` only; other URLs are left alone).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from queue import Empty
from typing import Any

from celery import Celery
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: The URL scheme (kombu transport alias) of :class:`Transport`.
SCHEME = "mqserve-redis"
#: How much of a dropped entry the log shows.
PREVIEW = 200


def envelope_problem(payload: Any) -> str:
    """Why ``payload`` (decoded JSON) is not a kombu message envelope, or ``""``.

    Checks what kombu's ``Message`` reads before Celery gets the message: the
    properties with their delivery tag and info, the headers, and a body that decodes.
    """
    if not isinstance(payload, dict):
        return "not a JSON object"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return "no properties"
    if not isinstance(props.get("delivery_tag"), str):
        return "no delivery tag"
    info = props.get("delivery_info")
    if not isinstance(info, dict) or not all(
        isinstance(info.get(k), str) for k in ("exchange", "routing_key")
    ):
        return "no delivery info"
    if not isinstance(payload.get("headers", {}), dict):
        return "headers are not an object"
    for name in ("content-type", "content-encoding"):
        if not isinstance(payload.get(name, ""), str):
            return f"{name} is not a string"
    body = payload.get("body")
    if body is None:
        return ""
    if not isinstance(body, str):
        return "body is not a string"
    if props.get("body_encoding") == "base64":
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return "body is not base64"
    return ""


def _preview(item: Any) -> str:
    return repr(item)[:PREVIEW]


class Channel(kombu_redis.Channel):
    """A Redis channel that drops queue entries that are not JSON."""

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # The entry was popped: nothing to acknowledge or restore. No message was
            # delivered, which is what Empty tells the caller.
            log.error("dropped a queue entry that is not a JSON message: %s", exc)
            raise Empty() from exc

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        # kombu's Redis channel takes no timeout; the base signature has one.
        try:
            return super()._get(queue)  # type: ignore[no-untyped-call]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.error("dropped an entry of %s that is not a JSON message: %s", queue, exc)
            raise Empty() from exc


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`, delivering only valid envelopes."""

    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message)
        if problem:
            log.error("dropped an entry of %s (%s): %s", queue, problem, _preview(message))
            return
        super()._deliver(message, queue)  # type: ignore[no-untyped-call]


def guard(app: Celery) -> None:
    """Make ``app`` consume through :class:`Transport` (its broker URL's scheme)."""
    kombu_transport.TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
    url = str(app.conf.broker_url or "")
    for scheme in ("redis://", "redis+socket://"):
        if url.startswith(scheme):
            app.conf.broker_url = SCHEME + url.removeprefix("redis")
            return
    log.warning("broker %s is not Redis: queue entries are not checked", url.split("://")[0])
