"""Token authorization (docs/torchserve-compat.md#token-authorization) with 192-bit keys
stored as digests."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import fakeredis.aioredis
import pytest
from falcon import testing

from control.core import keys
from control.core.settings import Settings
from control.http.auth import REFRESH_S, KeyStore, TokenAuth, digest
from control.http.common import new_app
from tests.support.asgi import async_twin

AUTHZ = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
AUTHN = "Token Authentication failed. Token either incorrect, expired, or not provided correctly"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keystore(redis_client: Any, tmp_path: Path, clock: Clock) -> KeyStore:
    return KeyStore(redis_client, tmp_path / "home" / "key_file.json", 60, clock=clock)


@pytest.fixture
def plain(keystore: KeyStore) -> dict[str, str]:
    return keystore.issue_all()


@pytest.fixture
def authed(make_client: Any, settings: Settings, keystore: KeyStore) -> testing.TestClient:
    return make_client(settings.replace(disable_token_authorization=False), keystore=keystore)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_invalid_key(result: testing.Result, message: str = AUTHZ) -> None:
    assert result.status_code == 400
    assert result.json == {"code": 400, "type": "InvalidKeyException", "message": message}
    assert result.headers["connection"] == "close"


def test_keys_are_strong_and_stored_as_digests(
    plain: dict[str, str], redis_client: Any, tmp_path: Path
) -> None:
    assert set(plain) == {"management", "inference", "API"}
    for role, key in plain.items():
        # URL-safe base64 carries 6 bits per character.
        assert len(key) * 6 >= 128
        assert redis_client.hget(keys.AUTH, role) == digest(key)
        assert key not in json.dumps(redis_client.hgetall(keys.AUTH))
    assert len(set(plain.values())) == 3
    key_file = tmp_path / "home" / "key_file.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    body = json.loads(key_file.read_text())
    assert body["management"]["key"] == plain["management"]
    assert body["management"]["expiration time"].endswith("Z")
    assert "expiration time" not in body["API"]


def test_requests_need_the_management_key(
    authed: testing.TestClient, plain: dict[str, str]
) -> None:
    assert_invalid_key(authed.simulate_get("/models"))
    assert_invalid_key(authed.simulate_get("/models", headers=bearer("wrong")))
    assert_invalid_key(authed.simulate_get("/models", headers=bearer(plain["inference"])))
    assert_invalid_key(
        authed.simulate_get("/models", headers={"Authorization": plain["management"]})
    )
    ok = authed.simulate_get("/models", headers=bearer(plain["management"]))
    assert ok.status_code == 200


def test_unknown_path_with_bad_token_is_400_not_404(
    authed: testing.TestClient, plain: dict[str, str]
) -> None:
    assert_invalid_key(authed.simulate_get("/nowhere"))
    assert authed.simulate_get("/nowhere", headers=bearer(plain["management"])).status_code == 404


def test_descriptions_need_no_token(authed: testing.TestClient, plain: dict[str, str]) -> None:
    assert authed.simulate_options("/").status_code == 200
    assert authed.simulate_get("/api-description").status_code == 200


def test_rotation_with_the_api_key(
    authed: testing.TestClient, plain: dict[str, str], tmp_path: Path
) -> None:
    result = authed.simulate_get(
        "/token", params={"type": "management"}, headers=bearer(plain["API"])
    )
    assert result.status_code == 200
    assert result.content == b"\n"
    fresh = json.loads((tmp_path / "home" / "key_file.json").read_text())["management"]["key"]
    assert fresh != plain["management"]
    assert_invalid_key(authed.simulate_get("/models", headers=bearer(plain["management"])))
    assert authed.simulate_get("/models", headers=bearer(fresh)).status_code == 200


@pytest.mark.parametrize(
    ("query", "role"),
    [
        ("type=management", "management"),
        ("type=API", "API"),
        ("type=bogus", "API"),
        ("", "API"),
    ],
)
def test_rotation_failures(
    authed: testing.TestClient, plain: dict[str, str], query: str, role: str
) -> None:
    result = authed.simulate_get("/token", query_string=query, headers=bearer(plain[role]))
    # Only the API key rotates, and only the management or inference key.
    assert_invalid_key(result, AUTHN)
    assert authed.simulate_get("/models", headers=bearer(plain["management"])).status_code == 200


def test_keys_expire(authed: testing.TestClient, plain: dict[str, str], clock: Clock) -> None:
    clock.now += 59 * 60
    assert authed.simulate_get("/models", headers=bearer(plain["management"])).status_code == 200
    clock.now += 2 * 60
    assert_invalid_key(authed.simulate_get("/models", headers=bearer(plain["management"])))
    # The API key never expires, and rotation issues a fresh management key.
    assert (
        authed.simulate_get(
            "/token", params={"type": "management"}, headers=bearer(plain["API"])
        ).status_code
        == 200
    )


def test_token_route_absent_without_auth(client: testing.TestClient) -> None:
    assert client.simulate_get("/token", params={"type": "management"}).status_code == 404


def test_verify_uses_constant_time_compare(
    keystore: KeyStore, plain: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    import hmac

    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("control.http.auth.hmac.compare_digest", spy)
    assert keystore.verify("management", plain["management"])
    assert not keystore.verify("management", "x" * 32)
    assert len(calls) == 2
    assert all(len(a) == len(b) == 64 for a, b in calls)  # digests, never raw keys


# -- the in-process copy of the digests (two TokenAuth = two API processes) ---------------


class Counting(fakeredis.aioredis.FakeRedis):
    """An asyncio fake client that counts the commands it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


class Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def auth_app(auth: TokenAuth) -> testing.TestClient:
    """An ASGI app behind ``auth`` whose every other path answers 200."""

    async def ok(req: Any, resp: Any, **_: Any) -> None:
        resp.status = 200
        resp.media = {"ok": True}

    app = new_app([auth])
    app.add_sink(ok, prefix="/")
    return testing.TestClient(app)


@pytest.fixture
def processes(
    redis_client: Any, keystore: KeyStore, plain: dict[str, str]
) -> tuple[testing.TestClient, testing.TestClient, Counting, Ticks]:
    """Two management processes over one Redis: A rotates, B only checks (``Counting``
    is B's client, ``Ticks`` B's monotonic clock)."""
    server = redis_client.connection_pool.connection_kwargs["server"]
    b_client, b_ticks = Counting(server=server), Ticks()
    a = auth_app(TokenAuth(keystore, "management", client=async_twin(redis_client)))
    b = auth_app(TokenAuth(keystore, "management", client=b_client, monotonic=b_ticks))
    return a, b, b_client, b_ticks


def rotate(app: testing.TestClient, api_key: str, tmp_path: Path) -> str:
    result = app.simulate_get("/token", params={"type": "management"}, headers=bearer(api_key))
    assert result.status_code == 200
    return str(json.loads((tmp_path / "home" / "key_file.json").read_text())["management"]["key"])


def test_keys_are_checked_against_a_copy_not_redis_per_request(
    processes: Any, plain: dict[str, str]
) -> None:
    _, b, b_client, ticks = processes
    for _ in range(20):
        assert b.simulate_get("/models", headers=bearer(plain["management"])).status_code == 200
    assert b_client.commands == ["HGETALL"]  # one read for twenty requests
    ticks.now += 1.5  # the copy is older than REFRESH_S: read again, once
    for _ in range(5):
        assert b.simulate_get("/models", headers=bearer(plain["management"])).status_code == 200
    assert b_client.commands == ["HGETALL", "HGETALL"]


def test_a_key_rotated_by_another_process_works_there_at_once(
    processes: Any, plain: dict[str, str], tmp_path: Path
) -> None:
    a, b, _, _ = processes
    assert b.simulate_get("/models", headers=bearer(plain["management"])).status_code == 200
    fresh = rotate(a, plain["API"], tmp_path)
    # The rotating process replaced its copy before answering.
    assert a.simulate_get("/models", headers=bearer(fresh)).status_code == 200
    assert_invalid_key(a.simulate_get("/models", headers=bearer(plain["management"])))
    # B's copy is fresh (its clock has not moved), yet the new key works at once.
    assert b.simulate_get("/models", headers=bearer(fresh)).status_code == 200


def test_a_rotated_away_key_stops_working_everywhere_within_a_second(
    processes: Any, plain: dict[str, str], tmp_path: Path
) -> None:
    a, b, _, ticks = processes
    old = plain["management"]
    assert b.simulate_get("/models", headers=bearer(old)).status_code == 200
    rotate(a, plain["API"], tmp_path)
    ticks.now += REFRESH_S + 0.01
    assert_invalid_key(b.simulate_get("/models", headers=bearer(old)))


def test_wrong_keys_are_refused_after_one_more_read(processes: Any, plain: dict[str, str]) -> None:
    _, b, b_client, _ = processes
    assert_invalid_key(b.simulate_get("/models", headers=bearer("wrong")))
    assert b_client.commands == ["HGETALL"]  # the copy was read for this very request
    # The copy is fresh, but a key it does not know may be newer than it: one re-read.
    assert_invalid_key(b.simulate_get("/models", headers=bearer("wrong")))
    assert b_client.commands == ["HGETALL", "HGETALL"]
    assert_invalid_key(b.simulate_get("/models"))  # no key at all: no read
    assert b_client.commands == ["HGETALL", "HGETALL"]


def test_without_an_async_client_the_copy_is_read_in_a_thread(
    keystore: KeyStore, plain: dict[str, str], tmp_path: Path
) -> None:
    app = auth_app(TokenAuth(keystore, "management"))
    assert app.simulate_get("/models", headers=bearer(plain["management"])).status_code == 200
    fresh = rotate(app, plain["API"], tmp_path)
    assert app.simulate_get("/models", headers=bearer(fresh)).status_code == 200
    assert_invalid_key(app.simulate_get("/models", headers=bearer(plain["management"])))


def test_concurrent_checks_share_one_read(
    redis_client: Any, keystore: KeyStore, plain: dict[str, str]
) -> None:
    server = redis_client.connection_pool.connection_kwargs["server"]
    client = Counting(server=server)
    auth = TokenAuth(keystore, "management", client=client)

    async def many() -> list[bool]:
        return list(
            await asyncio.gather(
                *(auth.verify("management", plain["management"]) for _ in range(10))
            )
        )

    assert asyncio.run(many()) == [True] * 10
    assert client.commands == ["HGETALL"]
