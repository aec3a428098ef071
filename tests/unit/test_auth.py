"""Token authorization (docs/torchserve-compat.md#token-authorization) with 192-bit keys
stored as digests."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from falcon import testing

from control.core import keys
from control.core.settings import Settings
from control.http.auth import KeyStore, digest

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
