"""The management API (port 8081): TorchServe's routes, status codes and bodies.

Routing mirrors TorchServe's ``ManagementRequestHandler`` rather than a router
table, because its answers depend on segment counts in ways a router would not
reproduce: ``POST /models/x`` is a 405, ``/models/a/b/c`` a 404, and
``GET /models/a/b/set-default`` describes the default version.

An ASGI app: the routes are coroutines. Describe and list are one asynchronous Redis
round trip each (``control.management.reads``); every other operation blocks (Redis
calls, archive downloads and unpacking, ``synchronous=true`` waits for workers) and runs
in a thread of the routes' own pool (``api_threads`` threads, as many as gthread had),
so a slow registration never holds up the event loop and the requests of other
clients, and a few waiting registrations cannot take every thread of asyncio's small
default pool (the token check's fallback read uses that one).
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs

import falcon
import falcon.asgi
import orjson

from control.core.errors import (
    BadRequestException,
    MethodNotAllowedException,
    ModelNotFoundException,
    ModelVersionNotFoundException,
    ResourceNotFoundException,
    WorkflowNotFoundException,
)
from control.http.auth import KeyStore, TokenAuth
from control.http.common import (
    RequestSizeLimit,
    new_app,
    read_body,
    segments,
    send_json,
    send_status,
)
from control.http.openapi import load_description
from control.http.params import Params
from control.management.reads import ManagementReads
from control.management.service import MAX_PAGE, ManagementService


def query_params(req: falcon.Request) -> Params:
    """Query parameters, first value winning, blanks kept (``limit=`` is "sent")."""
    return Params.from_query(parse_qs(req.query_string, keep_blank_values=True))


async def body_params(req: falcon.asgi.Request, limit: int) -> Params:
    """A JSON body's fields, for ``POST /models`` with ``Content-Type: application/json``."""
    raw = await read_body(req, limit)
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise BadRequestException(f"Invalid JSON request body: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise BadRequestException("Invalid JSON request body: expected an object")
    return Params(data)


T = TypeVar("T")


class ManagementRoutes:
    """A Falcon ASGI sink answering every path of the management port.

    Blocking service calls run in a pool of ``threads`` threads (started as needed):
    that many can wait at once (synchronous registrations) while describe, list and
    every other blocking call are still answered.
    """

    def __init__(self, service: ManagementService, reads: ManagementReads, threads: int) -> None:
        self._svc = service
        self._reads = reads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="management")

    async def _blocking(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in the pool, awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(call, *args))

    async def __call__(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response | None, **_: Any
    ) -> None:
        assert resp is not None  # None only for WebSocket sinks; the worker has no WebSockets
        segs = segments(req.path)
        if len(segs) <= 1 or req.path.rstrip("/") == "/api-description":
            self._root(req, resp, segs)
        elif segs[1] == "models" and (2 <= len(segs) <= 4 or _is_set_default(segs)):
            await self._models(req, resp, segs)
        elif _is_set_default(segs):
            raise ResourceNotFoundException()
        elif len(segs) == 4 and segs[1] == "v1" and segs[2] == "models":
            if req.method != "GET":
                raise MethodNotAllowedException()
            send_json(resp, await self._blocking(self._svc.kserve_ready, segs[3]))
        elif segs[1] == "workflows":
            self._workflows(req, resp, segs)
        else:
            raise ResourceNotFoundException()

    def _root(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, segs: list[str]) -> None:
        if req.path.rstrip("/") == "/api-description" or req.method == "OPTIONS":
            send_json(resp, load_description("management"))
        elif len(segs) <= 1:
            raise MethodNotAllowedException()
        else:
            raise ResourceNotFoundException()

    async def _models(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, segs: list[str]
    ) -> None:
        method = req.method
        settings = self._svc.settings
        svc = self._svc
        if len(segs) < 3:
            if method == "GET":
                send_json(resp, await self._reads.list_models(query_params(req)))
            elif method == "POST" and settings.enable_model_api:
                params = (
                    await body_params(req, settings.max_request_size)
                    if (req.content_type or "").split(";")[0].strip() == "application/json"
                    else query_params(req)
                )
                send_status(resp, *await self._blocking(svc.register, params))
            else:
                raise MethodNotAllowedException()
            return
        name = segs[2]
        version = segs[3] if len(segs) == 4 else None
        if method == "GET":
            customized = query_params(req).boolean("customized", False)
            send_json(resp, await self._reads.describe(name, version, customized))
        elif method == "PUT" and _is_set_default(segs):
            send_status(resp, *await self._blocking(svc.set_default, name, segs[3]))
        elif method == "PUT":
            params = query_params(req)
            send_status(resp, *await self._blocking(svc.scale, name, version, params))
        elif method == "DELETE" and settings.enable_model_api:
            send_status(resp, *await self._blocking(svc.unregister, name, version))
        elif method == "OPTIONS":
            try:
                await self._blocking(svc.registry.get, name, version)
            except ModelVersionNotFoundException:
                raise ModelNotFoundException(f"Model not found: {name}") from None
            send_json(resp, model_description(load_description("management"), name))
        else:
            raise MethodNotAllowedException()

    def _workflows(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, segs: list[str]
    ) -> None:
        # Workflow registration is disabled, as on TorchServe's master after 0.12.0, so
        # no workflow ever exists; the read and delete routes answer accordingly.
        method = req.method
        if len(segs) < 3:
            if method == "GET":
                params = query_params(req)
                limit = params.integer("limit", MAX_PAGE)
                limit = MAX_PAGE if limit > MAX_PAGE or limit < 0 else limit
                offset = max(params.integer("next_page_token", 0), 0)
                body: dict[str, Any] = {}
                if offset + limit <= 0:
                    body["nextPageToken"] = str(offset + limit)
                body["workflows"] = []
                send_json(resp, body)
            elif method == "POST":
                raise BadRequestException("Registering new workflows is disabled.")
            else:
                raise MethodNotAllowedException()
        elif method in ("GET", "DELETE"):
            raise WorkflowNotFoundException(f"Workflow not found: {segs[2]}")
        else:
            raise MethodNotAllowedException()


def _is_set_default(segs: list[str]) -> bool:
    return len(segs) == 5 and segs[4] == "set-default"


def model_description(description: dict[str, Any], name: str) -> dict[str, Any]:
    """The per-model OpenAPI (``OPTIONS /models/{name}``): the model's own paths."""
    doc = copy.deepcopy(description)
    doc["paths"] = {
        path.replace("{model_name}", name): _without_name_parameter(item)
        for path, item in doc["paths"].items()
        if path.startswith("/models/{model_name}")
    }
    doc["info"]["title"] = f"{description['info']['title']}: {name}"
    return doc


def _without_name_parameter(item: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``model_name`` path parameter: the name is now part of the path."""

    def keep(param: dict[str, Any]) -> bool:
        return param.get("name") != "model_name" and not str(param.get("$ref", "")).endswith(
            "/ModelName"
        )

    for operation in [item, *(v for v in item.values() if isinstance(v, dict))]:
        if isinstance(operation.get("parameters"), list):
            operation["parameters"] = [p for p in operation["parameters"] if keep(p)]
    return item


def create_management_app(
    service: ManagementService,
    keystore: KeyStore | None,
    extra: list[Any] | None = None,
    *,
    reads: ManagementReads,
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """The ASGI app of port 8081. ``keystore`` is None when token auth is disabled;
    ``extra`` middleware (response counters) runs first; ``reads`` answers describe and
    list, and its asyncio client also refreshes the token check's copy of the keys."""
    middleware: list[Any] = [*(extra or []), RequestSizeLimit(service.settings.max_request_size)]
    if keystore is not None:
        middleware.append(TokenAuth(keystore, "management", client=reads.client))
    app = new_app(middleware)
    routes = ManagementRoutes(service, reads, service.settings.api_threads)
    app.add_sink(routes, prefix="/")
    return app
