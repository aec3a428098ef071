"""Token authorization as TorchServe 0.11.1+ does it, with keys fit for the job.

Three roles: ``management`` (port 8081), ``inference`` (port 8080) and ``API`` (key
rotation through ``GET /token``). Keys are 192-bit random strings (TorchServe's are
48-bit); Redis holds only their SHA-256 digests and expiry times, shared by every API
process; the plaintext goes to the operator's key file (mode 0600) and nowhere else.
Comparison is constant-time. Failures are TorchServe's 400 ``InvalidKeyException``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import falcon
import redis
from redis.typing import EncodableT, FieldT

from control.core import keys
from control.core.errors import (
    AUTHENTICATION_FAILED,
    AUTHORIZATION_FAILED,
    InvalidKeyException,
)
from control.core.home import write_private
from control.core.redis_io import text
from control.core.timestamps import iso_time

ROLES = ("management", "inference", "API")
#: Bytes of randomness per key: 24 bytes = 192 bits, URL-safe base64 (32 characters).
KEY_BYTES = 24
_BEARER = re.compile(r"^Bearer\s+(\S+)$")


def digest(key: str) -> str:
    """SHA-256 hex digest of a key; what Redis stores."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Issues, rotates and verifies role keys; the registry of record is Redis."""

    def __init__(
        self,
        client: redis.Redis,
        key_file: Path,
        expiration_min: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._r = client
        self._key_file = key_file
        self._ttl = expiration_min * 60.0
        self._clock = clock

    def issue_all(self) -> dict[str, str]:
        """Generate fresh keys for every role (at server start) and write the key file."""
        fresh = {role: secrets.token_urlsafe(KEY_BYTES) for role in ROLES}
        mapping: dict[FieldT, EncodableT] = {}
        for role, key in fresh.items():
            mapping[role] = digest(key)
            if role != "API":
                mapping[f"{role}:expires"] = repr(self._clock() + self._ttl)
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(keys.AUTH)
        pipe.hset(keys.AUTH, mapping=mapping)
        pipe.execute()
        self._write_key_file(fresh)
        return fresh

    def rotate(self, role: str) -> str:
        """Replace one role's key (``GET /token?type=role``) and rewrite the key file."""
        key = secrets.token_urlsafe(KEY_BYTES)
        mapping: dict[FieldT, EncodableT] = {
            role: digest(key),
            f"{role}:expires": repr(self._clock() + self._ttl),
        }
        self._r.hset(keys.AUTH, mapping=mapping)
        current = self._read_key_file()
        current[role] = key
        self._write_key_file(current)
        return key

    def verify(self, role: str, presented: str | None) -> bool:
        """True when ``presented`` is the role's current, unexpired key."""
        if not presented:
            return False
        stored, expires = self._r.hmget(keys.AUTH, [role, f"{role}:expires"])
        if stored is None:
            return False
        ok = hmac.compare_digest(digest(presented), text(stored))
        if expires is not None and float(expires) < self._clock():
            return False
        return ok

    # -- the operator's key file --------------------------------------------------------

    def _write_key_file(self, plain: dict[str, str]) -> None:
        body: dict[str, dict[str, str]] = {}
        stored = self._r.hgetall(keys.AUTH)
        for role in ROLES:
            if role not in plain:
                continue
            entry = {"key": plain[role]}
            raw = stored.get(f"{role}:expires") or stored.get(f"{role}:expires".encode())
            if raw is not None:
                entry["expiration time"] = iso_time(float(raw))
            body[role] = entry
        self._key_file.parent.mkdir(parents=True, exist_ok=True)
        write_private(self._key_file, json.dumps(body, indent=2) + "\n")

    def _read_key_file(self) -> dict[str, str]:
        try:
            data = json.loads(self._key_file.read_text())
        except (OSError, ValueError):
            return {}
        return {role: entry["key"] for role, entry in data.items() if "key" in entry}


def bearer(req: falcon.Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, if well-formed."""
    header = req.get_header("Authorization")
    if header is None:
        return None
    match = _BEARER.match(header)
    return match.group(1) if match else None


class TokenAuth:
    """Falcon middleware: checks the port's role key before any routing.

    ``OPTIONS /`` and ``/api-description`` are exempt, as in TorchServe, and so are
    the paths in ``exempt`` (health probes cannot carry secrets). ``GET /token`` is
    answered here, authenticated with the API key.
    """

    def __init__(self, store: KeyStore, role: str, exempt: frozenset[str] = frozenset()) -> None:
        self._store = store
        self._role = role
        self._exempt = exempt

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        path = req.path.rstrip("/") or "/"
        if (req.method == "OPTIONS" and path == "/") or path == "/api-description":
            return
        if path in self._exempt:
            return
        if self._role == "management" and path == "/token":
            self._rotate(req, resp)
            return
        if not self._store.verify(self._role, bearer(req)):
            raise InvalidKeyException(AUTHORIZATION_FAILED)

    def _rotate(self, req: falcon.Request, resp: falcon.Response) -> None:
        role = req.get_param("type")
        if role not in ("management", "inference") or not self._store.verify("API", bearer(req)):
            raise InvalidKeyException(AUTHENTICATION_FAILED)
        self._store.rotate(role)
        resp.status = 200
        resp.content_type = "application/json"
        resp.data = b"\n"
        resp.complete = True
