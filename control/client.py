"""Python helpers for the management API, like TorchServe's ``ts.launcher`` helpers.

    >>> client = ManagementClient("http://127.0.0.1:8081", token="...")
    >>> client.register_model("iris", "iris.mar").status
    200

Module-level :func:`register_model` and :func:`register_model_with_params` take the
same arguments as TorchServe's test helpers plus ``base_url`` and ``token``. Responses
are returned, not raised: TorchServe's status codes are part of the contract.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3

DEFAULT_BASE_URL = "http://127.0.0.1:8081"

Params = Mapping[str, Any] | Iterable[tuple[str, Any]]


@dataclass(frozen=True)
class Response:
    """A management API answer: status, raw body and headers."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class ManagementClient:
    """A small, thread-safe client of one management endpoint."""

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, token: str | None = None, timeout: float = 600.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Synchronous calls wait for model loads: the read timeout must be generous.
        self._http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=timeout))

    def request(self, method: str, path: str, params: Params | None = None) -> Response:
        """Send one request; ``params`` become the query string (first value wins)."""
        query = f"?{urlencode(_pairs(params))}" if params else ""
        resp = self._http.request(
            method, f"{self.base_url}{path}{query}", headers=self._headers, retries=False
        )
        return Response(resp.status, resp.data, dict(resp.headers))

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
    model_name: str, url: str, base_url: str = DEFAULT_BASE_URL, token: str | None = None
) -> Response:
    """TorchServe's ``register_model``: one worker, synchronous."""
    return ManagementClient(base_url, token).register_model(model_name, url)


def register_model_with_params(
    params: Params, base_url: str = DEFAULT_BASE_URL, token: str | None = None
) -> Response:
    """TorchServe's ``register_model_with_params``."""
    return ManagementClient(base_url, token).register_model_with_params(params)
