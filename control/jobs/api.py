"""REST resources for batch jobs (``control.jobs.store``), mounted on the inference port.

=======================================  =============================================
``POST /jobs/{model}[/{version}]``       submit: 202 ``{"jobId", "status", "total"}``
                                         and ``Location: /jobs/{id}``
``GET /jobs/{id}``                       the job's status and counts
``GET /jobs/{id}/results``               ``?offset=0&limit=100`` (limit at most 1000):
                                         ``{"results": [...], "nextOffset"}``
``DELETE /jobs/{id}``                    cancel: ``{"status": "Job {id} cancelled"}``
=======================================  =============================================

A submission body is a JSON array (``Content-Type: application/json``) or JSON Lines
(``application/jsonl``, ``application/x-ndjson``, ``application/jsonlines`` or
``text/plain``); each element or non-blank line is one input, handed to the model as
an ``application/json`` body.

The resources are ASGI (the inference port's app); the job store is synchronous Redis
and Celery, so its calls run in a worker thread and never block the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

import falcon
import falcon.asgi
import orjson

from control.core.errors import BadRequestException, ConflictStatusException
from control.http.common import read_body, send_json, send_status
from control.http.params import Params
from control.jobs.store import CANCELLED, JobStore

DEFAULT_PAGE = 100
MAX_PAGE = 1000
JSON_TYPES = frozenset({"application/json"})
LINES_TYPES = frozenset(
    {"application/jsonl", "application/x-ndjson", "application/jsonlines", "text/plain"}
)


def json_lines(body: bytes) -> list[bytes]:
    """Each non-blank line of ``body``, checked to be one JSON value.

    Raises ``BadRequestException`` naming the (1-based) line of the first bad one.
    """
    items: list[bytes] = []
    for number, line in enumerate(body.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise BadRequestException(f"Invalid JSON on line {number}: {exc.msg}") from None
        items.append(line)
    return items


def json_array(body: bytes) -> list[bytes]:
    """The elements of a JSON array, each re-encoded as compact JSON."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequestException(f"Invalid JSON request body: {exc.msg}") from None
    if not isinstance(value, list):
        raise BadRequestException("Invalid JSON request body: expected an array of inputs")
    return [orjson.dumps(element) for element in value]


def parse_inputs(body: bytes, content_type: str | None) -> list[bytes]:
    """The inputs of a submission body; 400 when unparsable, empty, or of another type."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in JSON_TYPES:
        items = json_array(body)
    elif mime in LINES_TYPES:
        items = json_lines(body)
    else:
        raise BadRequestException(
            f"Unsupported Content-Type {mime or '(none)'}: send a JSON array "
            "(application/json) or JSON Lines (application/jsonl)"
        )
    if not items:
        raise BadRequestException("A batch job needs at least one input")
    return items


class _Jobs:
    """Shared by both resources: submission."""

    def __init__(self, store: JobStore, max_request_size: int) -> None:
        self._store = store
        self._limit = max_request_size

    async def _submit(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, model: str, version: str | None
    ) -> None:
        items = parse_inputs(await read_body(req, self._limit), req.content_type)
        status = await asyncio.to_thread(self._store.submit, model, version, items)
        resp.set_header("Location", f"/jobs/{status.job_id}")
        send_json(
            resp, {"jobId": status.job_id, "status": status.status, "total": status.total}, 202
        )


class JobResource(_Jobs):
    """``/jobs/{key}``: POST submits to model ``key``; GET and DELETE address job ``key``."""

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, key: str) -> None:
        await self._submit(req, resp, key, None)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, key: str) -> None:
        status = await asyncio.to_thread(self._store.status, key)
        send_json(resp, status.to_json())

    async def on_delete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, key: str
    ) -> None:
        status = await asyncio.to_thread(self._store.cancel, key)
        if status.status != CANCELLED:
            raise ConflictStatusException(f"Job {key} has already {status.status}")
        send_status(resp, 200, f"Job {key} cancelled")


class JobPartResource(_Jobs):
    """``/jobs/{key}/{part}``: POST submits to version ``part`` of model ``key``; GET
    with ``part == "results"`` pages job ``key``'s results."""

    async def on_post(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, key: str, part: str
    ) -> None:
        await self._submit(req, resp, key, part)

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, key: str, part: str
    ) -> None:
        if part != "results":
            raise falcon.HTTPNotFound()
        params = Params.from_query(parse_qs(req.query_string, keep_blank_values=True))
        offset = max(params.integer("offset", 0), 0)
        limit = params.integer("limit", DEFAULT_PAGE)
        limit = DEFAULT_PAGE if limit < 0 else min(limit, MAX_PAGE)
        results, next_offset = await asyncio.to_thread(self._store.results_page, key, offset, limit)
        body: dict[str, Any] = {"results": results}
        if next_offset is not None:
            body["nextOffset"] = next_offset
        send_json(resp, body)


def add_job_routes(
    app: falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response],
    store: JobStore,
    max_request_size: int,
) -> None:
    """Mount the job resources on ``app`` (one built by ``control.http.common.new_app``).

    Both resources use the same field names because Falcon refuses templates that
    differ only in them; the method tells a model name from a job id.
    """
    app.add_route("/jobs/{key}", JobResource(store, max_request_size))
    app.add_route("/jobs/{key}/{part}", JobPartResource(store, max_request_size))
