"""Wiring: build the WSGI apps of each port from :class:`Settings`.

The launcher writes the settings to a JSON file and names it in ``MQSERVE_SETTINGS``;
gunicorn calls :func:`management_app` in each of its worker processes. Nothing here
connects to Redis at import time, so forking stays safe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis

from control.archive import Limits, ModelStore
from control.auth import KeyStore, TokenAuth
from control.dispatch import Dispatcher
from control.health import healthy
from control.http import RequestSizeLimit, WSGIApp, close_on_error
from control.inference import create_inference_app
from control.jobs import JobStore
from control.jobs_api import add_job_routes
from control.management import create_management_app
from control.metrics import CountResponses, MetricsRecorder, create_metrics_app
from control.redis_io import redis_bytes_client, redis_client
from control.service import ManagementService
from control.settings import Settings
from workers.celery_app import make_celery

SETTINGS_ENV = "MQSERVE_SETTINGS"


def model_store(settings: Settings) -> ModelStore:
    """The model store as settings describe it."""
    return ModelStore(
        settings.model_store,
        settings.allowed_urls,
        Limits(
            max_download_bytes=settings.max_download_bytes,
            max_archive_bytes=settings.max_archive_bytes,
            max_archive_entries=settings.max_archive_entries,
        ),
    )


def keystore(settings: Settings, client: redis.Redis) -> KeyStore | None:
    """The key store, or None when token authorization is disabled."""
    if not settings.token_auth:
        return None
    return KeyStore(client, settings.key_file, settings.token_expiration_min)


def management_service(settings: Settings, client: redis.Redis) -> ManagementService:
    """The management operations over ``client``."""
    dispatcher = Dispatcher(redis_bytes_client(settings.redis_url)) if settings.redis_url else None
    return ManagementService(settings, client, model_store(settings), dispatcher=dispatcher)


def recorder_for(settings: Settings) -> MetricsRecorder:
    """This process's metrics recorder, flushed to Redis every second by a daemon thread."""
    url = settings.redis_url
    if url is None:
        raise RuntimeError("settings.redis_url must be set before building an app")
    recorder = MetricsRecorder()
    recorder.start_flusher(lambda: redis_client(url))
    return recorder


def build_management(settings: Settings, client: redis.Redis | None = None) -> WSGIApp:
    """The management app, ready for any WSGI server."""
    if client is None:
        if settings.redis_url is None:
            raise RuntimeError("settings.redis_url must be set before building an app")
        client = redis_client(settings.redis_url)
    app = create_management_app(
        management_service(settings, client), keystore(settings, client),
        [CountResponses(recorder_for(settings))],
    )  # fmt: skip
    return close_on_error(app)


def build_inference(settings: Settings, client: redis.Redis | None = None) -> WSGIApp:
    """The inference app (port 8080), ready for any WSGI server."""
    url = settings.redis_url
    if url is None:
        raise RuntimeError("settings.redis_url must be set before building an app")
    text = client if client is not None else redis_client(url)
    dispatcher = Dispatcher(redis_bytes_client(url))
    recorder = recorder_for(settings)
    middleware: list[Any] = [CountResponses(recorder), RequestSizeLimit(settings.max_request_size)]
    store = keystore(settings, text)
    if store is not None:
        # Health probes cannot carry secrets: /ping answers without a key.
        middleware.append(TokenAuth(store, "inference", exempt=frozenset({"/ping"})))
    app = create_inference_app(settings, dispatcher, lambda: healthy(text), middleware, recorder)
    # Beyond TorchServe: queue-submitted batch jobs, on the same port and keys.
    add_job_routes(app, JobStore(text, make_celery(settings)), settings.max_request_size)
    return close_on_error(app)


def metrics_app() -> WSGIApp:
    """gunicorn entry point: ``gunicorn 'control.server:metrics_app()'``."""
    settings = settings_from_env()
    if settings.redis_url is None:
        raise RuntimeError("settings.redis_url must be set before building an app")
    client = redis_client(settings.redis_url)
    return close_on_error(create_metrics_app(client, recorder_for(settings)))


def inference_app() -> WSGIApp:
    """gunicorn entry point: ``gunicorn 'control.server:inference_app()'``."""
    return build_inference(settings_from_env())


def settings_from_env() -> Settings:
    """The settings file the launcher named in ``MQSERVE_SETTINGS``."""
    path = os.environ.get(SETTINGS_ENV)
    if not path:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start apps through `mqserve start`")
    return Settings.from_json(Path(path).read_text())


def management_app() -> WSGIApp:
    """gunicorn entry point: ``gunicorn 'control.server:management_app()'``."""
    return build_management(settings_from_env())
