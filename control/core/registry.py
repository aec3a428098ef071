"""The model registry: desired state in Redis, changed only by atomic Lua scripts.

Every change that touches more than one key runs as one Lua script, so two API
processes racing on the same name and version see exactly one winner, and a process
that dies mid-request leaves either the whole change or none of it. Reads are plain
commands; a read racing a delete is answered as "not found".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from control.core import keys
from control.core.errors import (
    ConflictStatusException,
    InvalidModelVersionException,
    ModelNotFoundException,
    ModelVersionNotFoundException,
)
from control.core.redis_io import text
from control.core.spec import ModelSpec

# Every write script takes the registry revision (``keys.REVISION``) as its last key and
# increments it when it changes anything: API processes validate their caches by it.

# KEYS: models, model, versions, version, seq, revision
# ARGV: name, version, spec, min, max, now, channel, event
_REGISTER = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[4], 'spec', ARGV[3], 'min_workers', ARGV[4], 'max_workers', ARGV[5],
           'generation', 1, 'registered_at', ARGV[6])
redis.call('ZADD', KEYS[3], seq, ARGV[2])
redis.call('ZADD', KEYS[1], 0, ARGV[1])
local made_default = redis.call('HSETNX', KEYS[2], 'default', ARGV[2])
redis.call('INCR', KEYS[#KEYS])
redis.call('PUBLISH', ARGV[#ARGV - 1], ARGV[#ARGV])
return 1 + made_default
"""

# KEYS: model, version, revision   ARGV: min, max, channel, event
_SCALE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 0 then return -2 end
redis.call('HSET', KEYS[2], 'min_workers', ARGV[1], 'max_workers', ARGV[2])
local gen = redis.call('HINCRBY', KEYS[2], 'generation', 1)
redis.call('INCR', KEYS[#KEYS])
redis.call('PUBLISH', ARGV[#ARGV - 1], ARGV[#ARGV])
return gen
"""

# KEYS: model, versions, version, revision   ARGV: version
_SET_DEFAULT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[3]) == 0 then return -2 end
redis.call('HSET', KEYS[1], 'default', ARGV[1])
redis.call('INCR', KEYS[#KEYS])
return 1
"""

# KEYS: model, versions, version, revision   ARGV: version, channel, event
# Stops the version's workers (desired 0) after the checks an unregister must pass.
_PREPARE_UNREGISTER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[3]) == 0 then return -2 end
if redis.call('HGET', KEYS[1], 'default') == ARGV[1] and redis.call('ZCARD', KEYS[2]) > 1 then
  return -3
end
redis.call('HSET', KEYS[3], 'min_workers', 0, 'max_workers', 0)
redis.call('HINCRBY', KEYS[3], 'generation', 1)
redis.call('INCR', KEYS[#KEYS])
redis.call('PUBLISH', ARGV[#ARGV - 1], ARGV[#ARGV])
return 1
"""

# KEYS: models, model, versions, version, revision   ARGV: name, version, channel, event
_DELETE = """
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[4]) == 0 then return -2 end
if redis.call('HGET', KEYS[2], 'default') == ARGV[2] and redis.call('ZCARD', KEYS[3]) > 1 then
  return -3
end
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('ZCARD', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('INCR', KEYS[#KEYS])
redis.call('PUBLISH', ARGV[#ARGV - 1], ARGV[#ARGV])
return 1
"""


@dataclass(frozen=True)
class VersionRecord:
    """A registered version with its desired worker counts."""

    spec: ModelSpec
    min_workers: int
    max_workers: int
    generation: int
    is_default: bool
    registered_at: float


class Registry:
    """Registrations, versions, default versions and desired worker counts.

    Owns no connection state beyond the given client; safe to share between threads.
    Raises the TorchServe errors of ``control.core.errors``; message wording for versions
    differs between endpoints in TorchServe, so callers pick it via ``version_message``.
    """

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self._r = client
        self._clock = clock
        self._register = client.register_script(_REGISTER)
        self._scale = client.register_script(_SCALE)
        self._set_default = client.register_script(_SET_DEFAULT)
        self._prepare_unregister = client.register_script(_PREPARE_UNREGISTER)
        self._delete = client.register_script(_DELETE)

    # -- writes ----------------------------------------------------------------------

    def register(self, spec: ModelSpec, min_workers: int, max_workers: int) -> bool:
        """Add a version; returns True when it became the default version.

        Raises ConflictStatusException (409) when the name and version exist.
        """
        name, ver = spec.model_name, spec.version
        result = self._register(
            keys=[
                keys.MODELS,
                keys.model(name),
                keys.versions(name),
                keys.version(name, ver),
                keys.SEQ,
                keys.REVISION,
            ],
            args=[
                name,
                ver,
                spec.to_json(),
                min_workers,
                max_workers,
                self._clock(),
                keys.EVENTS,
                keys.event(name, ver),
            ],
        )
        if int(result) == 0:
            raise ConflictStatusException(
                f"Model version {ver} is already registered for model {name}"
            )
        return int(result) == 2

    def scale(self, name: str, version: str | None, min_workers: int, max_workers: int) -> str:
        """Set the desired worker counts; returns the version changed (default if None)."""
        ver = version if version is not None else self.default_version(name)
        result = int(
            self._scale(
                keys=[keys.model(name), keys.version(name, ver), keys.REVISION],
                args=[min_workers, max_workers, keys.EVENTS, keys.event(name, ver)],
            )
        )
        self._raise_missing(result, name, ver)
        return ver

    def set_default(self, name: str, version: str) -> None:
        """Make ``version`` the default; 404s use set-default's wording (no colons)."""
        result = int(
            self._set_default(
                keys=[
                    keys.model(name),
                    keys.versions(name),
                    keys.version(name, version),
                    keys.REVISION,
                ],
                args=[version],
            )
        )
        if result == -1:
            raise ModelNotFoundException(f"Model not found: {name}")
        if result == -2:
            raise ModelVersionNotFoundException(
                f"Model version {version} does not exist for model {name}"
            )

    def prepare_unregister(self, name: str, version: str | None) -> VersionRecord:
        """Check an unregister may proceed and set the version's workers to zero."""
        record = self.get(name, version)
        ver = record.spec.version
        result = int(
            self._prepare_unregister(
                keys=[
                    keys.model(name),
                    keys.versions(name),
                    keys.version(name, ver),
                    keys.REVISION,
                ],
                args=[ver, keys.EVENTS, keys.event(name, ver)],
            )
        )
        self._raise_missing(result, name, ver)
        return record

    def delete(self, name: str, version: str) -> None:
        """Remove a version (and the model with its last version) atomically."""
        result = int(
            self._delete(
                keys=[
                    keys.MODELS,
                    keys.model(name),
                    keys.versions(name),
                    keys.version(name, version),
                    keys.REVISION,
                ],
                args=[name, version, keys.EVENTS, keys.event(name, version)],
            )
        )
        self._raise_missing(result, name, version)

    # -- reads -----------------------------------------------------------------------

    def revision(self) -> int:
        """The registry revision: it changes with every write of desired state."""
        return int(self._r.get(keys.REVISION) or 0)

    def default_version(self, name: str) -> str:
        """The default version of ``name``; 404 when the model is unknown."""
        default = self._r.hget(keys.model(name), "default")
        if default is None:
            raise ModelNotFoundException(f"Model not found: {name}")
        return text(default)

    def get(self, name: str, version: str | None = None) -> VersionRecord:
        """One version (the default when ``version`` is None)."""
        default = self.default_version(name)
        ver = default if version is None else version
        raw = self._r.hgetall(keys.version(name, ver))
        if not raw:
            if version is None:  # deleted between the two reads
                raise ModelNotFoundException(f"Model not found: {name}")
            raise ModelVersionNotFoundException(
                f"Model version: {ver} does not exist for model: {name}"
            )
        return parse_record(raw, is_default=ver == default)

    def all_versions(self, name: str) -> list[VersionRecord]:
        """Every version of ``name`` in registration order; 404 when unknown."""
        default = self.default_version(name)
        vers = [text(v) for v in self._r.zrange(keys.versions(name), 0, -1)]
        pipe = self._r.pipeline(transaction=False)
        for ver in vers:
            pipe.hgetall(keys.version(name, ver))
        return [
            parse_record(raw, is_default=ver == default)
            for ver, raw in zip(vers, pipe.execute(), strict=True)
            if raw
        ]

    def list_models(self, offset: int, limit: int) -> tuple[list[tuple[str, str]], int]:
        """``([(name, default version's url)], total)`` for a page in name order."""
        total = int(self._r.zcard(keys.MODELS))
        if limit <= 0 or offset >= total:
            return [], total
        names = [text(n) for n in self._r.zrange(keys.MODELS, offset, offset + limit - 1)]
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hget(keys.model(name), "default")
        defaults = pipe.execute()
        for name, ver in zip(names, defaults, strict=True):
            pipe.hget(keys.version(name, text(ver or "")), "spec")
        page: list[tuple[str, str]] = []
        for name, spec in zip(names, pipe.execute(), strict=True):
            if spec is not None:
                page.append((name, ModelSpec.from_json(spec).url))
        return page, total

    def all_default_records(self) -> list[VersionRecord]:
        """The default version of every model (for health and startup checks)."""
        names = [text(n) for n in self._r.zrange(keys.MODELS, 0, -1)]
        out: list[VersionRecord] = []
        for name in names:
            try:
                out.append(self.get(name))
            except ModelNotFoundException:
                continue
        return out

    def desired(self) -> list[VersionRecord]:
        """Every registered version of every model (what supervisors reconcile)."""
        out: list[VersionRecord] = []
        for name in (text(n) for n in self._r.zrange(keys.MODELS, 0, -1)):
            try:
                out.extend(self.all_versions(name))
            except ModelNotFoundException:
                continue
        return out

    @staticmethod
    def _raise_missing(result: int, name: str, ver: str) -> None:
        if result == -1:
            raise ModelNotFoundException(f"Model not found: {name}")
        if result == -2:
            raise ModelVersionNotFoundException(
                f"Model version: {ver} does not exist for model: {name}"
            )
        if result == -3:
            raise InvalidModelVersionException(f"Cannot remove default version for model {name}")


def parse_record(raw: dict[Any, Any], is_default: bool) -> VersionRecord:
    """A version HASH as read (bytes or str values) as a :class:`VersionRecord`."""
    data = {text(k): text(v) for k, v in raw.items()}
    return VersionRecord(
        spec=ModelSpec.from_json(data["spec"]),
        min_workers=int(data["min_workers"]),
        max_workers=int(data["max_workers"]),
        generation=int(data["generation"]),
        is_default=is_default,
        registered_at=float(data.get("registered_at", "0")),
    )
