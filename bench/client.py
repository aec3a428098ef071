"""A minimal HTTP client for TorchServe-compatible APIs, standard library only.

Every request opens its own connection, so a server that closes connections after
errors (TorchServe does) never leaves a stale one behind, and :meth:`Endpoint.call`
checks the status of every answer: a benchmark that times failures measures nothing.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit


class BenchError(RuntimeError):
    """The server answered something a benchmark cannot use; the message says what."""


@dataclass(frozen=True)
class Reply:
    """One HTTP answer."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON; :class:`BenchError` if it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise BenchError(f"expected a JSON body, got {self.body[:200]!r}") from exc


class Endpoint:
    """One base URL (``http://host:port``, optionally with a path prefix) and its token."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BenchError(f"{base_url!r} is not an http(s)://host:port URL")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout

    def request(
        self, method: str, path: str, params: dict[str, Any] | None = None, body: bytes = b""
    ) -> Reply:
        """Send one request; ``params`` become the query string. Never raises on a status.

        Connection failures raise :class:`BenchError` naming the URL.
        """
        query = f"?{urlencode(params)}" if params else ""
        target = f"{self._prefix}{path}{query}"
        conn_type = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = conn_type(self._host, self._port, timeout=self._timeout)
        try:
            conn.request(method, target, body=body or None, headers=self._headers)
            resp = conn.getresponse()
            return Reply(resp.status, resp.read())
        except OSError as exc:
            raise BenchError(f"{method} {self.base_url}{path}{query} failed: {exc}") from exc
        finally:
            conn.close()

    def call(
        self, method: str, path: str, params: dict[str, Any] | None = None, expect: int = 200
    ) -> Reply:
        """:meth:`request`, raising :class:`BenchError` unless the status is ``expect``."""
        reply = self.request(method, path, params)
        if reply.status != expect:
            query = f"?{urlencode(params)}" if params else ""
            text = reply.body.decode(errors="replace").strip()
            hint = ""
            if reply.status in (400, 401) and "Token" in text:
                hint = "\n(the server wants an API key: pass --token KEY or --key-file PATH)"
            raise BenchError(
                f"{method} {path}{query} answered {reply.status} (expected {expect}): {text}{hint}"
            )
        return reply


def expect_workers(management: Endpoint, name: str, count: int, change: str) -> None:
    """Fail unless the description of ``name`` lists ``count`` workers after ``change``."""
    described = management.call("GET", f"/models/{name}").json()
    try:
        workers = described[0]["workers"]
    except (IndexError, KeyError, TypeError) as exc:
        raise BenchError(f"unexpected description of {name}: {described!r}") from exc
    if len(workers) != count:
        raise BenchError(f"{name} lists {len(workers)} workers after {change}: {workers!r}")


def read_key(key_file: Path, role: str = "management") -> str:
    """The ``role`` key from a TorchServe/mqserve ``key_file.json``.

    Raises :class:`BenchError` when the file is unreadable or has no such key.
    """
    try:
        data = json.loads(key_file.read_text())
        key = data[role]["key"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"no {role} key in {key_file}: {exc}") from exc
    if not isinstance(key, str) or not key:
        raise BenchError(f"no {role} key in {key_file}")
    return key
