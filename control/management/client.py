"""Python clients of the management API, and how they find it and its key.

Two faces share one transport (:func:`management_request`, built on ``requests``):

* ``ts.launcher`` (``workers/compat/ts/launcher.py``): TorchServe's own helpers,
  ``register_model(name, url)`` and ``register_model_with_params(params)``, returning
  ``requests.Response`` objects exactly as TorchServe's do;
* :class:`ManagementClient`, whose :class:`Response` has ``status``, ``body``,
  ``headers`` and ``json()``::

      >>> client = ManagementClient("http://127.0.0.1:8081", token="...")
      >>> client.register_model("iris", "iris.mar").status
      200

Where the management API is (:func:`find_management`), first match wins: an explicit
``base_url``; ``$MQSERVE_MANAGEMENT_URL``; the ``management_address`` of the stack last
started in ``$MQSERVE_HOME`` (default ``~/.mqserve``; its ``run/settings.json``); else
``http://127.0.0.1:8081``, TorchServe's default. The key: an explicit ``token``;
``$MQSERVE_TOKEN``; else the ``management`` key of ``$MQSERVE_HOME/key_file.json``, but
only when the address is that home's own (a home's key never goes to another server).
No key at all is fine when the server runs with ``--disable-token-auth``.

Requests ignore proxy variables and ``.netrc``: the management API is a private
endpoint, and a proxy would see the bearer key (``.netrc`` credentials would even
replace it). Connecting may take 10 s; reading an answer 600 s, because a synchronous
registration answers only once its workers have loaded the model (archive download,
worker start and TorchServe's 120 s default startup timeout). Answers are returned,
never raised: TorchServe's status codes are part of the contract.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from control.core.home import Home

DEFAULT_BASE_URL = "http://127.0.0.1:8081"
MANAGEMENT_URL_ENV = "MQSERVE_MANAGEMENT_URL"
TOKEN_ENV = "MQSERVE_TOKEN"  # noqa: S105 (the name of a variable, not a key)
#: The same variable and default as ``control.cli`` (not imported: it pulls in the server).
HOME_ENV = "MQSERVE_HOME"
DEFAULT_HOME = "~/.mqserve"
#: Seconds to connect, and to wait for an answer (see the module docstring).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0

Params = Mapping[str, Any] | Iterable[tuple[str, Any]]
_LOOPBACK = {"localhost": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


@dataclass(frozen=True)
class Endpoint:
    """A management API: its base URL (no trailing ``/``) and the key to present."""

    url: str
    token: str | None


def find_management(
    base_url: str | None = None, token: str | None = None, home: Path | None = None
) -> Endpoint:
    """The management API to talk to and its key, by the rules of the module docstring."""
    layout = Home.at(home or Path(os.environ.get(HOME_ENV) or DEFAULT_HOME))
    home_url = _home_address(layout) or DEFAULT_BASE_URL
    url = base_url or os.environ.get(MANAGEMENT_URL_ENV) or home_url
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None and _same_server(url, home_url):
        token = _home_key(layout)
    return Endpoint(_connectable(url).rstrip("/"), token)


def _home_address(home: Home) -> str | None:
    """``management_address`` from the settings the home's stack wrote when it started."""
    try:
        address = json.loads(home.settings_file.read_text()).get("management_address")
    except (OSError, ValueError, AttributeError):
        return None
    return address if isinstance(address, str) and address else None


def _home_key(home: Home) -> str | None:
    try:
        key = json.loads(home.key_file.read_text())["management"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return key if isinstance(key, str) and key else None


def _connectable(url: str) -> str:
    """``url`` with a wildcard bind address (``0.0.0.0``, ``[::]``) replaced by loopback."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = parts.hostname or ""
    if host not in ("0.0.0.0", "::"):  # noqa: S104
        return parts.geturl()
    loop = _LOOPBACK[host]
    netloc = f"[{loop}]" if ":" in loop else loop
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def _same_server(a: str, b: str) -> bool:
    def key(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        host = parts.hostname or ""
        return parts.scheme or "http", _LOOPBACK.get(host, host), parts.port

    try:
        return key(a) == key(b)
    except ValueError:  # an unparsable port: not the home's address
        return False


def new_session(token: str | None) -> requests.Session:
    """A ``requests`` session for one management API: its key, no proxies, no .netrc."""
    session = requests.Session()
    session.trust_env = False
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


def management_request(
    method: str,
    path: str,
    params: Any = None,
    base_url: str | None = None,
    token: str | None = None,
) -> requests.Response:
    """One request to the management API found by :func:`find_management`.

    ``params`` go to ``requests`` as they are (a mapping or ``(name, value)`` pairs),
    as TorchServe's helpers pass them.
    """
    endpoint = find_management(base_url, token)
    with new_session(endpoint.token) as session:
        return session.request(
            method,
            f"{endpoint.url}{path}",
            params=params,
            timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            allow_redirects=False,
        )


def wait_for_management(
    timeout: float = 60.0, base_url: str | None = None, poll: float = 0.2
) -> str:
    """Block until the management API answers HTTP (any status: 401 is an answer).

    Returns its base URL; raises ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        endpoint = find_management(base_url)  # a starting stack may still write its address
        try:
            with new_session(endpoint.token) as session:
                session.get(f"{endpoint.url}/models", timeout=(2.0, 10.0))
        except requests.RequestException as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the management API at {endpoint.url} did not answer in {timeout:g} s: {exc}"
                ) from None
            time.sleep(poll)
        else:
            return endpoint.url


@dataclass(frozen=True)
class Response:
    """A management API answer: status, raw body and headers (case-insensitive)."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @classmethod
    def of(cls, response: requests.Response) -> Response:
        """The answer held by a ``requests`` response."""
        return cls(response.status_code, response.content, response.headers)


class ManagementClient:
    """A thread-safe client of one management API (found as :func:`find_management` says).

    Each thread keeps its own connection pool (``requests`` sessions are not thread-safe).
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = READ_TIMEOUT_S,
    ) -> None:
        endpoint = find_management(base_url, token)
        self.base_url = endpoint.url
        self._token = endpoint.token
        self._timeout = (CONNECT_TIMEOUT_S, timeout)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = new_session(self._token)
        return session

    def close(self) -> None:
        """Close the calling thread's connections (others close when their thread ends)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    def request(self, method: str, path: str, params: Params | None = None) -> Response:
        """Send one request; ``params`` become the query string (booleans as ``true``)."""
        resp = self._session().request(
            method,
            f"{self.base_url}{path}",
            params=_pairs(params) if params else None,
            timeout=self._timeout,
            allow_redirects=False,
        )
        return Response.of(resp)

    def register_model(self, model_name: str, url: str) -> Response:
        """Register ``url`` as ``model_name`` with one worker, waiting until it serves."""
        return self.register_model_with_params(
            {"model_name": model_name, "url": url, "initial_workers": 1, "synchronous": "true"}
        )

    def register_model_with_params(self, params: Params) -> Response:
        """``POST /models`` with any of TorchServe's register parameters."""
        return self.request("POST", "/models", params)

    def scale(self, model_name: str, params: Params | None = None) -> Response:
        """``PUT /models/{name}`` with scale parameters."""
        return self.request("PUT", f"/models/{model_name}", params)

    def describe(self, model_name: str, version: str | None = None) -> Response:
        """``GET /models/{name}[/{version}]``."""
        suffix = f"/{version}" if version else ""
        return self.request("GET", f"/models/{model_name}{suffix}")

    def unregister_model(self, model_name: str, version: str | None = None) -> Response:
        """``DELETE /models/{name}[/{version}]``."""
        suffix = f"/{version}" if version else ""
        return self.request("DELETE", f"/models/{model_name}{suffix}")


def _pairs(params: Params) -> list[tuple[str, str]]:
    items = params.items() if isinstance(params, Mapping) else params
    out = []
    for key, value in items:
        if isinstance(value, bool):
            value = "true" if value else "false"
        out.append((key, str(value)))
    return out


def register_model(
    model_name: str, url: str, base_url: str | None = None, token: str | None = None
) -> Response:
    """TorchServe's ``register_model`` (one worker, synchronous) as a :class:`Response`."""
    return ManagementClient(base_url, token).register_model(model_name, url)


def register_model_with_params(
    params: Params, base_url: str | None = None, token: str | None = None
) -> Response:
    """TorchServe's ``register_model_with_params`` as a :class:`Response`."""
    return ManagementClient(base_url, token).register_model_with_params(params)
