"""Wiring: build the apps of each port from :class:`Settings` (ASGI for inference and
management, WSGI for metrics).

The launcher writes the settings to a JSON file and names it in ``MQSERVE_SETTINGS``;
gunicorn calls :func:`management_app` in each of its worker processes. Nothing here
connects to Redis at import time, so forking stays safe.

``model_store`` (now in ``control.archives.store``) and ``settings_from_env`` /
``SETTINGS_ENV`` (now in ``control.core.settings``) are re-exported here for existing
callers; processes that must not load Falcon (model workers, the supervisor) import
them from their own modules.
"""

from __future__ import annotations

from typing import Any

import falcon.asgi
import redis
import redis.asyncio

from control.archives.store import model_store
from control.core.celery_app import make_celery
from control.core.dispatch import Dispatcher
from control.core.redis_io import Clients, connect, connect_async, redis_client
from control.core.settings import SETTINGS_ENV, Settings, settings_from_env
from control.http.auth import KeyStore, TokenAuth
from control.http.common import RequestSizeLimit, WSGIApp, close_on_error
from control.inference.api import create_inference_app
from control.inference.health import healthy
from control.jobs.api import add_job_routes
from control.jobs.store import JobStore
from control.management.api import create_management_app
from control.management.reads import ManagementReads
from control.management.service import ManagementService
from control.metrics.api import CountResponses, create_metrics_app
from control.metrics.recorder import MetricsRecorder

__all__ = [
    "SETTINGS_ENV",
    "build_inference",
    "build_management",
    "inference_app",
    "keystore",
    "management_app",
    "management_service",
    "metrics_app",
    "model_store",
    "process_clients",
    "recorder_for",
    "settings_from_env",
]


def keystore(settings: Settings, client: redis.Redis) -> KeyStore | None:
    """The key store, or None when token authorization is disabled."""
    if not settings.token_auth:
        return None
    return KeyStore(client, settings.key_file, settings.token_expiration_min)


def management_service(
    settings: Settings, client: redis.Redis, frames: redis.Redis | None = None
) -> ManagementService:
    """The management operations over ``client``; given ``frames`` (a bytes client of
    the same Redis) unregister answers the requests still queued too. Without it (the
    launcher's startup registrations) it does not."""
    return ManagementService(settings, client, model_store(settings), frames=frames)


def recorder_for(client: redis.Redis) -> MetricsRecorder:
    """This process's metrics recorder, flushed to ``client`` every second by a daemon
    thread."""
    recorder = MetricsRecorder()
    recorder.start_flusher(client)
    return recorder


def process_clients(settings: Settings) -> Clients:
    """The Redis clients of one API process, which every part of its app shares."""
    if settings.redis_url is None:
        raise RuntimeError("settings.redis_url must be set before building an app")
    return connect(settings.redis_url)


def build_management(
    settings: Settings,
    clients: Clients | None = None,
    frames: redis.asyncio.Redis | None = None,
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """The management app (port 8081), an ASGI app for any ASGI server; over ``clients``
    (default: :func:`process_clients`) for the blocking operations run in threads
    (register, scale, set-default, unregister, keys) and ``frames``, an asyncio bytes
    client of the same Redis (default: :func:`control.core.redis_io.connect_async`), for
    describe, list, ``customized=true`` and the token check; no other connection pool."""
    clients = clients or process_clients(settings)
    if frames is None:
        assert settings.redis_url is not None  # process_clients checked it
        frames = connect_async(settings.redis_url)
    client = clients.text
    reads = ManagementReads(frames, Dispatcher(frames))
    return create_management_app(
        management_service(settings, client, clients.frames), keystore(settings, client),
        [CountResponses(recorder_for(client))], reads=reads,
    )  # fmt: skip


def build_inference(
    settings: Settings,
    clients: Clients | None = None,
    frames: redis.asyncio.Redis | None = None,
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """The inference app (port 8080), an ASGI app for any ASGI server; over ``clients``
    (default: :func:`process_clients`) for what is synchronous (health, metrics, batch
    jobs, keys) and ``frames``, an asyncio bytes client of the same Redis (default:
    :func:`control.core.redis_io.connect_async`), for the request path."""
    clients = clients or process_clients(settings)
    text = clients.text
    if frames is None:
        assert settings.redis_url is not None  # process_clients checked it
        frames = connect_async(settings.redis_url)
    dispatcher = Dispatcher(frames)
    recorder = recorder_for(text)
    middleware: list[Any] = [CountResponses(recorder), RequestSizeLimit(settings.max_request_size)]
    store = keystore(settings, text)
    if store is not None:
        # Health probes cannot carry secrets: /ping answers without a key.
        middleware.append(TokenAuth(store, "inference", exempt=frozenset({"/ping"}), client=frames))
    app = create_inference_app(settings, dispatcher, lambda: healthy(text), middleware, recorder)
    # Beyond TorchServe: queue-submitted batch jobs, on the same port and keys.
    add_job_routes(app, JobStore(text, make_celery(settings)), settings.max_request_size)
    return app


def metrics_app() -> WSGIApp:
    """gunicorn entry point: ``gunicorn 'control.server:metrics_app()'``."""
    settings = settings_from_env()
    if settings.redis_url is None:
        raise RuntimeError("settings.redis_url must be set before building an app")
    client = redis_client(settings.redis_url)  # the metrics port reads no frames
    return close_on_error(create_metrics_app(client, recorder_for(client)))


def inference_app() -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """gunicorn entry point (an ASGI worker): ``gunicorn 'control.server:inference_app()'``."""
    return build_inference(settings_from_env())


def management_app() -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """gunicorn entry point (an ASGI worker): ``gunicorn 'control.server:management_app()'``."""
    return build_management(settings_from_env())
