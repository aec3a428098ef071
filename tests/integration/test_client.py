"""``control.management.client``: finding the management API and its key, and the
shared transport."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from control import cli
from control.management import client
from control.management.client import Endpoint, ManagementClient, find_management
from tests.support.json_server import json_server

ENV = (client.MANAGEMENT_URL_ENV, client.TOKEN_ENV, client.HOME_ENV, "HTTP_PROXY", "NETRC")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ambient configuration: an empty ``MQSERVE_HOME``; returns it."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv(client.HOME_ENV, str(home))
    return home


def write_home(home: Path, address: str | None, key: str | None) -> None:
    """What a running stack leaves in its home: run/settings.json and key_file.json."""
    (home / "run").mkdir(parents=True, exist_ok=True)
    if address is not None:
        (home / "run" / "settings.json").write_text(json.dumps({"management_address": address}))
    if key is not None:
        keys = {"management": {"key": key}, "inference": {"key": "inf"}}
        (home / "key_file.json").write_text(json.dumps(keys))


def test_home_variable_matches_the_cli() -> None:
    assert (client.HOME_ENV, client.DEFAULT_HOME) == (cli.HOME_ENV, cli.DEFAULT_HOME)


def test_defaults_to_torchserves_address_without_a_key() -> None:
    assert find_management() == Endpoint("http://127.0.0.1:8081", None)


def test_the_homes_running_stack_gives_address_and_key(clean_env: Path) -> None:
    write_home(clean_env, "http://127.0.0.1:18081", "k1")
    assert find_management() == Endpoint("http://127.0.0.1:18081", "k1")
    # A stack bound to every interface is reached on loopback, with the same key.
    write_home(clean_env, "http://0.0.0.0:18082", None)
    assert find_management() == Endpoint("http://127.0.0.1:18082", "k1")
    write_home(clean_env, "[::]:18083", None)
    assert find_management() == Endpoint("http://[::1]:18083", "k1")


def test_key_file_alone_is_the_default_addresses_key(clean_env: Path) -> None:
    write_home(clean_env, None, "k1")
    assert find_management() == Endpoint("http://127.0.0.1:8081", "k1")
    assert find_management("http://localhost:8081/") == Endpoint("http://localhost:8081", "k1")


def test_environment_overrides_the_home(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_home(clean_env, "http://127.0.0.1:18081", "k1")
    monkeypatch.setenv(client.TOKEN_ENV, "from-env")
    assert find_management() == Endpoint("http://127.0.0.1:18081", "from-env")
    monkeypatch.setenv(client.MANAGEMENT_URL_ENV, "http://10.1.2.3:8081/")
    assert find_management() == Endpoint("http://10.1.2.3:8081", "from-env")


def test_a_homes_key_never_goes_to_another_server(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_home(clean_env, "http://127.0.0.1:18081", "k1")
    monkeypatch.setenv(client.MANAGEMENT_URL_ENV, "http://models.example:8081")
    assert find_management() == Endpoint("http://models.example:8081", None)
    assert find_management("http://127.0.0.1:18082") == Endpoint("http://127.0.0.1:18082", None)
    # Explicit arguments beat everything.
    assert find_management("http://h:1", "t") == Endpoint("http://h:1", "t")


@pytest.mark.parametrize(
    "settings", ["not json", "[]", '{"management_address": 5}', '{"management_address": ""}']
)
def test_unreadable_home_files_fall_back(clean_env: Path, settings: str) -> None:
    (clean_env / "run").mkdir(parents=True)
    (clean_env / "run" / "settings.json").write_text(settings)
    (clean_env / "key_file.json").write_text('{"management": {}}')
    assert find_management() == Endpoint("http://127.0.0.1:8081", None)


class Recorder:
    """A fake management API that records each request."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.seen: list[tuple[str, str, list[tuple[str, str]], str | None]] = []

    def answer(self, method: str, path: str, auth: str | None, body: bytes) -> tuple[int, Any]:
        url = urlsplit(path)
        self.seen.append((method, url.path, parse_qsl(url.query, keep_blank_values=True), auth))
        return self.status, {"status": "ok"}


def test_management_request_returns_requests_response(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Recorder()
    with json_server(fake.answer) as url:
        monkeypatch.setenv(client.MANAGEMENT_URL_ENV, url)
        monkeypatch.setenv(client.TOKEN_ENV, "secret")
        response = client.management_request("POST", "/models", (("url", "a.mar"), ("x", "1")))
    assert isinstance(response, requests.Response)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert fake.seen == [("POST", "/models", [("url", "a.mar"), ("x", "1")], "Bearer secret")]


def test_proxies_and_netrc_from_the_environment_are_ignored(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login user password pw\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "")
    fake = Recorder()
    with json_server(fake.answer) as url:
        response = client.management_request("GET", "/models", base_url=url, token="secret")
    assert response.status_code == 200
    assert fake.seen[0][3] == "Bearer secret"


def test_timeouts_are_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts: list[Any] = []
    original = requests.Session.request

    def spy(self: requests.Session, *args: Any, **kwargs: Any) -> requests.Response:
        timeouts.append(kwargs.get("timeout"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", spy)
    with json_server(Recorder().answer) as url:
        client.management_request("GET", "/models", base_url=url)
        ManagementClient(url).describe("m")
        ManagementClient(url, timeout=30).describe("m")
    assert timeouts == [(10.0, 600.0), (10.0, 600.0), (10.0, 30)]


def test_management_client_keeps_its_response_shape() -> None:
    fake = Recorder(status=404)
    with json_server(fake.answer) as url:
        api = ManagementClient(url, token="t")
        response = api.scale("m", {"min_worker": 2, "synchronous": True})
        api.close()
    assert (response.status, response.json()) == (404, {"status": "ok"})
    assert response.body == b'{"status": "ok"}'
    assert response.headers["content-type"] == "application/json"  # case-insensitive
    assert fake.seen == [
        ("PUT", "/models/m", [("min_worker", "2"), ("synchronous", "true")], "Bearer t")
    ]


def test_management_client_serves_many_threads() -> None:
    fake = Recorder()
    with json_server(fake.answer) as url:
        api = ManagementClient(url)
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda: statuses.append(api.describe("m").status))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert statuses == [200] * 8


def test_wait_for_management_accepts_any_answer() -> None:
    with json_server(Recorder(status=401).answer) as url:
        assert client.wait_for_management(5, url) == url


def test_wait_for_management_gives_up_after_its_timeout() -> None:
    with json_server(Recorder().answer) as url:
        pass  # the port is free again: nothing answers
    with pytest.raises(TimeoutError, match=r"did not answer in 0\.3 s"):
        client.wait_for_management(0.3, url, poll=0.05)
