"""Wiring: build the WSGI apps of each port from :class:`Settings`.

The launcher writes the settings to a JSON file and names it in ``MQSERVE_SETTINGS``;
gunicorn calls :func:`management_app` in each of its worker processes. Nothing here
connects to Redis at import time, so forking stays safe.
"""

from __future__ import annotations

import os
from pathlib import Path

import redis

from control.archive import Limits, ModelStore
from control.auth import KeyStore
from control.http import WSGIApp, close_on_error
from control.management import create_management_app
from control.service import ManagementService
from control.settings import Settings

SETTINGS_ENV = "MQSERVE_SETTINGS"


def redis_client(url: str) -> redis.Redis:
    """A thread-safe client (connection pool) returning ``str`` values."""
    return redis.Redis.from_url(
        url, decode_responses=True, health_check_interval=25, socket_connect_timeout=5
    )


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
    return ManagementService(settings, client, model_store(settings))


def build_management(settings: Settings, client: redis.Redis | None = None) -> WSGIApp:
    """The management app, ready for any WSGI server."""
    if client is None:
        if settings.redis_url is None:
            raise RuntimeError("settings.redis_url must be set before building an app")
        client = redis_client(settings.redis_url)
    app = create_management_app(management_service(settings, client), keystore(settings, client))
    return close_on_error(app)


def settings_from_env() -> Settings:
    """The settings file the launcher named in ``MQSERVE_SETTINGS``."""
    path = os.environ.get(SETTINGS_ENV)
    if not path:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start apps through `mqserve start`")
    return Settings.from_json(Path(path).read_text())


def management_app() -> WSGIApp:
    """gunicorn entry point: ``gunicorn 'control.server:management_app()'``."""
    return build_management(settings_from_env())
