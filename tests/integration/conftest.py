"""Integration-tier fixtures: one real redis-server per session, flushed per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from control.core.settings import Settings
from tests.support import chaos
from tests.support.processes import redis_server


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the chaos tests' figures (sent/answered/failed/lost per fault) at the end."""
    chaos.terminal_summary(terminalreporter)


@pytest.fixture(scope="session")
def redis_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    with redis.Redis.from_url(redis_server_url) as client:
        client.flushall()
    return redis_server_url


@pytest.fixture
def real_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A text client of this test's Redis, closed after the test."""
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def stack_settings(redis_url: str, store: Path, tmp_path: Path) -> Settings:
    """Settings of a test stack: this test's Redis and store, model API on, no tokens."""
    return Settings(
        model_store=store,
        enable_model_api=True,
        disable_token_authorization=True,
        redis_url=redis_url,
        home=tmp_path / "home",
        worker_spawn_timeout=60,
    )
