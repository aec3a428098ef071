"""The metrics port (8082) and the middleware counting every port's responses.

Falcon's side of :mod:`control.metrics.recorder`, kept apart so that the recorder a model worker
uses does not import any HTTP framework.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import falcon
import redis

from control.core.errors import MethodNotAllowedException, ResourceNotFoundException
from control.http.common import new_wsgi_app, segments, send_json
from control.http.openapi import load_description
from control.metrics.recorder import MetricsRecorder
from control.metrics.render import CONTENT_TYPE, render

__all__ = ["CountResponses", "MetricsRoutes", "create_metrics_app"]


class CountResponses:
    """Falcon middleware counting every response in ``Requests2XX/4XX/5XX``, in a WSGI
    app (the metrics port) and an ASGI one (inference, management) alike.

    Runs after the error handlers, so error responses count with their final status.
    """

    def __init__(self, recorder: MetricsRecorder) -> None:
        self._recorder = recorder

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, ok: bool
    ) -> None:
        self._recorder.request(resp.status_code)

    async def process_response_async(
        self, req: falcon.Request, resp: falcon.Response, resource: object, ok: bool
    ) -> None:
        """The ASGI form: counting is an in-memory increment, nothing to await."""
        self._recorder.request(resp.status_code)


class MetricsRoutes:
    """A Falcon sink answering every path of the metrics port.

    ``GET /metrics`` (and HEAD) serve the page; ``OPTIONS /`` and ``/api-description``
    (any method) the OpenAPI description; any other method on ``/`` or ``/metrics`` is
    405 and any other path 404. Trailing slashes are ignored.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: Any) -> None:
        segs = segments(req.path)
        if not segs:
            if req.method != "OPTIONS":
                raise MethodNotAllowedException()
            send_json(resp, load_description("metrics"))
        elif segs == ["", "api-description"]:
            send_json(resp, load_description("metrics"))
        elif segs == ["", "metrics"]:
            if req.method not in ("GET", "HEAD"):
                raise MethodNotAllowedException()
            # Blank values are kept: TorchServe filters on them too (to an empty page).
            query = parse_qs(req.query_string, keep_blank_values=True)
            names = set(query["name[]"]) if "name[]" in query else None
            resp.status = 200
            resp.content_type = CONTENT_TYPE
            resp.text = render(self._client, names)
        else:
            raise ResourceNotFoundException()


def create_metrics_app(
    client: redis.Redis, recorder: MetricsRecorder | None = None
) -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app of the metrics port; no token check (TorchServe has none there).

    With ``recorder``, this port's own responses are counted too, as TorchServe counts
    the responses of every port.
    """
    app = new_wsgi_app([CountResponses(recorder)] if recorder is not None else [])
    app.add_sink(MetricsRoutes(client), prefix="/")
    return app
