"""The management app under gunicorn over real Redis: the Python helpers and HTTP framing."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from control.core.settings import Settings
from control.management.client import ManagementClient, register_model, register_model_with_params
from tests.support.archives import build_mar
from tests.support.fakes import FakeFleet
from tests.support.processes import management_process


@pytest.fixture
def api(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[str]:
    build_mar(store / "noop.mar", "noop")
    build_mar(store / "other.mar", "other")
    settings = stack_settings.replace(worker_spawn_timeout=10)
    with management_process(settings, tmp_path / "api") as base:
        yield base


@pytest.fixture
def fleet(real_redis: redis.Redis, stack_settings: Settings) -> Iterator[FakeFleet]:
    """The real supervisor over in-process fake workers (the app is what is tested here)."""
    fake = FakeFleet(real_redis, stack_settings)
    with fake.running():
        yield fake


def test_register_helpers(api: str, fleet: FakeFleet) -> None:
    response = register_model("noop", "noop.mar", base_url=api)
    assert response.status == 200
    assert response.json() == {
        "status": 'Model "noop" Version: 1.0 registered with 1 initial workers'
    }
    response = register_model_with_params(
        [("url", "other.mar"), ("batch_size", 4), ("initial_workers", 0)], base_url=api
    )
    assert response.status == 200
    client = ManagementClient(api)
    described = client.describe("noop").json()[0]
    assert [w["status"] for w in described["workers"]] == ["READY"]
    assert client.describe("other").json()[0]["batchSize"] == 4
    assert client.scale("noop", {"min_worker": 2, "synchronous": True}).status == 200
    assert len(client.describe("noop").json()[0]["workers"]) == 2
    assert client.unregister_model("noop").status == 200
    assert client.describe("noop").status == 404


def test_connection_framing(api: str) -> None:
    parts = urlsplit(api)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", "/models")
    ok = conn.getresponse()
    ok.read()
    assert ok.status == 200
    assert ok.getheader("Connection") == "keep-alive"
    assert ok.getheader("x-request-id")
    conn.request("GET", "/models")  # the same connection stays usable after a success
    again = conn.getresponse()
    again.read()
    assert again.status == 200
    conn.request("GET", "/models/nope")
    missing = conn.getresponse()
    body = missing.read()
    assert missing.status == 404
    assert body == (
        b'{\n  "code": 404,\n  "type": "ModelNotFoundException",\n'
        b'  "message": "Model not found: nope"\n}\n'
    )
    assert missing.getheader("Connection") == "close"  # errors close the connection
    assert missing.getheader("Cache-Control") == "no-cache; no-store, must-revalidate, private"
    conn.close()
