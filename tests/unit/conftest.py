"""Unit-tier fixtures: fakeredis, a model store in tmp_path, the management app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from falcon import testing

from control.archives.store import ModelStore
from control.core.settings import Settings
from control.http.auth import KeyStore
from control.management.service import ManagementService
from tests.support.archives import build_mar
from tests.support.asgi import management_client
from tests.support.fakes import FakeFleet


@pytest.fixture
def redis_client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    build_mar(store / "noop.mar", "noop", "1.0")
    build_mar(store / "noop_v2.mar", "noop", "2.0")
    build_mar(store / "other.mar", "other", "1.0")
    return store


@pytest.fixture
def settings(store_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        model_store=store_dir,
        enable_model_api=True,
        disable_token_authorization=True,
        redis_url="redis://unused",
        worker_spawn_timeout=5,
        unregister_model_timeout=5,
    )


AppFactory = Callable[..., testing.TestClient]


@pytest.fixture
def make_client(redis_client: fakeredis.FakeRedis) -> AppFactory:
    """Build a TestClient for given settings (and optional fetch stub / key store)."""

    def make(
        settings: Settings,
        fetch: Any = None,
        keystore: KeyStore | None = None,
        clock: Callable[[], float] | None = None,
    ) -> testing.TestClient:
        store = ModelStore(settings.model_store, settings.allowed_urls, fetch=fetch)
        kwargs = {"clock": clock} if clock is not None else {}
        service = ManagementService(settings, redis_client, store, **kwargs)
        return management_client(service, redis_client, keystore)

    return make


@pytest.fixture
def client(make_client: AppFactory, settings: Settings) -> testing.TestClient:
    return make_client(settings)


@pytest.fixture
def fleet(redis_client: fakeredis.FakeRedis, settings: Settings) -> Iterator[FakeFleet]:
    """The real supervisor over in-process fake workers that load their models with the
    real loader (``tests.support.fakes.FakeFleet``): a model loads or fails as it would
    in a real worker, with the real reason."""
    fake = FakeFleet(redis_client, settings)
    with fake.running():
        yield fake
