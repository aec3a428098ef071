"""Token authorization as TorchServe 0.11.1+ does it, with keys fit for the job.

Three roles: ``management`` (port 8081), ``inference`` (port 8080) and ``API`` (key
rotation through ``GET /token``). Keys are 192-bit random strings (TorchServe's are
48-bit); Redis holds only their SHA-256 digests and expiry times, shared by every API
process; the plaintext goes to the operator's key file (mode 0600) and nowhere else.
Comparison is constant-time. Failures are TorchServe's 400 ``InvalidKeyException``.

Each API process checks keys against its own copy of the digests and expiry times
(:class:`TokenAuth`), not with a Redis read per request. The copy follows rotations:

* the process that rotates a key replaces its copy before it answers;
* in any other process a key it does not know makes it re-read the digests once before
  refusing, so a freshly rotated key works everywhere at once;
* the copy is re-read when it is older than :data:`REFRESH_S` (one second), so a key
  rotated away stops working in every process within a second of the rotation.

Expiry is checked against the clock on every request, from the copied expiry time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcon
import falcon.asgi
import redis
import redis.asyncio
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
#: The longest a process goes on trusting its copy of the digests (module docstring).
REFRESH_S = 1.0


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
        """True when ``presented`` is the role's current, unexpired key (one Redis read;
        the HTTP ports use :class:`TokenAuth`'s copy instead)."""
        if not presented:
            return False
        stored, expires = self._r.hmget(keys.AUTH, [role, f"{role}:expires"])
        if stored is None:
            return False
        ok = hmac.compare_digest(digest(presented), text(stored))
        if expires is not None and float(expires) < self._clock():
            return False
        return ok

    def now(self) -> float:
        """The wall clock keys expire by (epoch seconds)."""
        return self._clock()

    def snapshot(self) -> KeyDigests:
        """Every role's digest and expiry time, read from Redis at once."""
        return KeyDigests.parse(self._r.hgetall(keys.AUTH))

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


@dataclass(frozen=True)
class KeyDigests:
    """A copy of ``mqs:auth``: role -> (SHA-256 hex digest, expiry epoch or None)."""

    roles: Mapping[str, tuple[str, float | None]]

    @classmethod
    def parse(cls, raw: Mapping[Any, Any]) -> KeyDigests:
        """From the HASH as read (bytes or str, either client)."""
        data = {text(k): text(v) for k, v in raw.items()}
        roles: dict[str, tuple[str, float | None]] = {}
        for role in ROLES:
            if role in data:
                expires = data.get(f"{role}:expires")
                roles[role] = (data[role], None if expires is None else float(expires))
        return cls(roles)

    def verify(self, role: str, presented: str, now: float) -> bool:
        """True when ``presented`` is ``role``'s key in this copy and unexpired at ``now``."""
        entry = self.roles.get(role)
        if entry is None:
            return False
        stored, expires = entry
        ok = hmac.compare_digest(digest(presented), stored)
        return ok and (expires is None or expires >= now)


def bearer(req: falcon.Request) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, if well-formed."""
    return bearer_key(req.get_header("Authorization"))


def bearer_key(header: str | None) -> str | None:
    """The key of an ``Authorization`` value ``Bearer <key>`` (an HTTP header or gRPC
    metadata), if well-formed."""
    if header is None:
        return None
    match = _BEARER.match(header)
    return match.group(1) if match else None


class TokenAuth:
    """Falcon ASGI middleware: checks the port's role key before any routing.

    ``OPTIONS /`` and ``/api-description`` are exempt, as in TorchServe, and so are
    the paths in ``exempt`` (health probes cannot carry secrets). ``GET /token`` is
    answered here, authenticated with the API key.

    Keys are checked against this process's copy of the digests, refreshed as the module
    docstring says: a rotated-in key works at once, a rotated-away key stops working
    within :data:`REFRESH_S`. The copy is read with ``client`` (an asyncio client of
    the same Redis) when given, else with the key store's client in a thread; either
    way at most one read is in flight per process, shared by the requests waiting on it.
    ``monotonic`` times the copy's age (tests pass a fake clock).
    """

    def __init__(
        self,
        store: KeyStore,
        role: str,
        exempt: frozenset[str] = frozenset(),
        client: redis.asyncio.Redis | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._role = role
        self._exempt = exempt
        self._client = client
        self._monotonic = monotonic
        self._copy = KeyDigests({})
        #: When the copy was read (``monotonic``); -inf: never, so the first check reads.
        self._read_at = float("-inf")
        #: Reads of the copy begun so far. A request that needs a fresher copy than the one
        #: it found shares any read begun after it arrived, and starts one otherwise.
        self._started = 0
        self._lock = asyncio.Lock()

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        path = req.path.rstrip("/") or "/"
        if (req.method == "OPTIONS" and path == "/") or path == "/api-description":
            return
        if path in self._exempt:
            return
        if self._role == "management" and path == "/token":
            await self._rotate(req, resp)
            return
        if not await self.verify(self._role, bearer(req)):
            raise InvalidKeyException(AUTHORIZATION_FAILED)

    async def verify(self, role: str, presented: str | None) -> bool:
        """True when ``presented`` is ``role``'s current, unexpired key."""
        if not presented:
            return False
        seen = self._started
        if self._stale():
            await self._refresh(seen, stale_only=True)
        if self._copy.verify(role, presented, self._store.now()):
            return True
        # Unknown here, but perhaps rotated in by another process since the copy was read:
        # read again, unless a read begun since this request arrived already has.
        await self._refresh(seen)
        return self._copy.verify(role, presented, self._store.now())

    def _stale(self) -> bool:
        return self._monotonic() - self._read_at > REFRESH_S

    async def _refresh(self, seen: int | None, stale_only: bool = False) -> None:
        """Re-read the copy, unless a read began after the caller found ``seen`` reads
        begun (requests waiting together share it), or, with ``stale_only``, the copy is
        no longer stale (a read in flight when it arrived is recent enough); ``None``:
        read regardless."""
        async with self._lock:
            if seen is not None and self._started != seen:
                return
            if stale_only and not self._stale():
                return
            self._started += 1
            began = self._monotonic()
            try:
                if self._client is not None:
                    copy = KeyDigests.parse(await self._client.hgetall(keys.AUTH))
                else:
                    copy = await asyncio.to_thread(self._store.snapshot)
            except BaseException:
                self._started -= 1  # nothing was read: who waited on it reads again
                raise
            self._copy, self._read_at = copy, began

    async def _rotate(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        role = req.get_param("type")
        if role not in ("management", "inference") or not await self.verify("API", bearer(req)):
            raise InvalidKeyException(AUTHENTICATION_FAILED)
        # Redis writes and the key file: off the event loop.
        await asyncio.to_thread(self._store.rotate, role)
        await self._refresh(None)  # a read begun before the rotation would miss it
        resp.status = 200
        resp.content_type = "application/json"
        resp.data = b"\n"
        resp.complete = True
