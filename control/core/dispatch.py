"""The API side of the request path: put a request on its model's queue, await the reply.

One request costs two Redis round trips here: a Lua script that checks the registry
revision, that a worker can take it and the queue bound, and pushes the frame (one
atomic step), and a blocking pop of the reply list (no polling: the reply wakes the
waiting thread). Workers take frames with BLMOVE, answer with LPUSH, and the
supervisor answers for workers that die.

How long the API waits. As TorchServe: a request waits in the queue for as long as a
worker that can take it exists, then its worker has ``response_timeout`` seconds for
the batch, after which the supervisor kills the worker and answers "Worker died.".
The API therefore sets no timeout of its own: it blocks in chunks of
:data:`control.core.redis_io.BLOCK_CHUNK` seconds and between chunks asks Redis, in one
script, whether the request is still alive (answered, queued while a worker can take
it, or held by a live worker). A request left queued when no worker can take it any
more is taken off the queue and answered 503 at once; a request nobody holds any more
(its host vanished) is answered "Worker died." at once. Requests still queued when
their version is unregistered are answered 503 by the unregister itself
(:meth:`Dispatcher.refuse_queued`): their waiting threads wake at once.

Read your writes. Specs are cached per process with the registry revision they were
read at (``keys.REVISION``); the push refuses a stale revision, and the request is
routed again from a fresh read. Once a set-default, scale or unregister call has
returned, every later request is routed by the new state.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from control.core import keys
from control.core.envelope import Part, Reply, Request, readable_id
from control.core.errors import (
    InternalServerException,
    ModelServerError,
    ServiceUnavailableException,
)
from control.core.observed import SERVING
from control.core.redis_io import block_for
from control.core.registry import Registry, VersionRecord

_SERVING_STATES = sorted(state.value for state in SERVING)

# KEYS: online queue, workers index, registry revision
# ARGV: frame, capacity, worker key prefix, revision ('' = do not check), serving states...
_PUSH = """
if ARGV[4] ~= '' and (redis.call('GET', KEYS[3]) or '0') ~= ARGV[4] then return -3 end
local serving = {}
for i = 5, #ARGV do serving[ARGV[i]] = true end
local alive = false
for _, wid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local state = redis.call('HGET', ARGV[3] .. wid, 'state')
  if state then
    if serving[state] then alive = true break end
  else
    redis.call('SREM', KEYS[2], wid)
  end
end
if not alive then return -1 end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -2 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""

# KEYS: reply list, online queue, workers index
# ARGV: frame, worker key prefix, in-flight key prefix, serving states...
# 1: alive (answered, held by a live worker, or queued while a worker can take it);
# -1: queued with no worker left that can take it (taken off the queue); 0: lost.
_ALIVE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
local serving = {}
for i = 4, #ARGV do serving[ARGV[i]] = true end
local can_serve = false
for _, wid in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local state = redis.call('HGET', ARGV[2] .. wid, 'state')
  if state then
    if serving[state] then can_serve = true end
    if redis.call('LPOS', ARGV[3] .. wid, ARGV[1]) then return 1 end
  end
end
if redis.call('LPOS', KEYS[2], ARGV[1]) then
  if can_serve then return 1 end
  redis.call('LREM', KEYS[2], 1, ARGV[1])
  return -1
end
return 0
"""

_NO_WORKER, _QUEUE_FULL, _STALE = -1, -2, -3
#: The ``reason`` of the reply :meth:`Dispatcher.refuse_queued` gives a queued request:
#: the waiting API answers it as it answers "no worker" (TorchServe's 503).
VERSION_GONE = "version unregistered"
#: How long a waiting request rides out a Redis outage before it is answered 503.
REDIS_OUTAGE_WAIT = 30.0
#: Pause between attempts while Redis is unreachable.
OUTAGE_PAUSE = 0.5
#: Attempts at pushing: the cached spec, a fresh read, then a fresh read unchecked (a
#: registry that changes on every request must not starve it).
_ATTEMPTS = 3


class NoWorker(ServiceUnavailableException):
    """The model version has no worker that can take requests."""


class QueueFull(ServiceUnavailableException):
    """The model's online queue is at ``job_queue_size``."""


@dataclass(frozen=True)
class Delivery:
    """A reply, the version that answered and how long the request queued (metrics)."""

    reply: Reply
    queue_seconds: float
    version: str = ""


class Dispatcher:
    """Sends requests to model workers; thread-safe, one per API process.

    ``client`` must return bytes (``decode_responses=False``): frames carry raw bytes.
    """

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self._r = client
        self._clock = clock
        self._push = client.register_script(_PUSH)
        self._alive = client.register_script(_ALIVE)
        self._registry = Registry(client)
        self._specs: dict[tuple[str, str | None], tuple[int, VersionRecord]] = {}

    def lookup(self, model: str, version: str | None, fresh: bool = False) -> VersionRecord:
        """The registered version (default if None); TorchServe's 404s when unknown.

        Served from this process's cache unless ``fresh``; :meth:`send` validates what
        it routes by against the registry revision, so a stale entry is never used.
        """
        return self._route(model, version, fresh)[1]

    def _route(self, model: str, version: str | None, fresh: bool) -> tuple[int, VersionRecord]:
        cached = None if fresh else self._specs.get((model, version))
        if cached is not None:
            return cached
        # The revision first: the record read after it is at least that new.
        revision = self._registry.revision()
        try:
            record = self._registry.get(model, version)
        except ModelServerError:  # gone: forget it, so that no caller sees it again
            self._specs.pop((model, version), None)
            raise
        self._specs[(model, version)] = (revision, record)
        return revision, record

    def refuse_queued(self, model: str, version: str) -> int:
        """Answer every request queued for ``model``/``version`` with "no worker" (503)
        and empty its online queue; returns how many were answered.

        Called while the version is being unregistered (its workers told to stop take
        nothing more): the waiting API threads are woken now, not at their next
        liveness check. A frame whose id cannot be read is just dropped.
        """
        queue = keys.online_queue(model, version)
        pipe = self._r.pipeline(transaction=True)
        pipe.lrange(queue, 0, -1)
        pipe.delete(queue)
        frames, _ = pipe.execute()
        reply = Reply(status=503, reason=VERSION_GONE, error=VERSION_GONE).frame()
        pipe = self._r.pipeline(transaction=False)
        for frame in frames:
            rid = readable_id(frame if isinstance(frame, bytes) else str(frame).encode())
            if rid is not None:
                pipe.lpush(keys.reply(rid), reply)
                pipe.pexpire(keys.reply(rid), keys.REPLY_TTL_MS)
        pipe.execute()
        return len(frames)

    def send(
        self,
        model: str,
        version: str | None,
        parts: tuple[Part, ...],
        headers: dict[str, str],
        request_id: str | None = None,
        kind: str = "predict",
    ) -> Delivery:
        """Queue one request for ``model`` (``version``, or the default) and wait for its reply.

        Raises the registry's 404s, :class:`NoWorker`, :class:`QueueFull`, or
        InternalServerException("Worker died.") when the request was lost.
        """
        rid = request_id or uuid.uuid4().hex
        for attempt in range(_ATTEMPTS):
            revision, record = self._route(model, version, fresh=attempt > 0)
            spec = record.spec
            now = self._clock()
            # clientTimeoutInMills: a request older than that when a worker takes it is
            # not run (0: no limit, TorchServe's default).
            limit = spec.client_timeout_ms / 1000.0
            request = Request(
                id=rid, model=spec.model_name, version=spec.version,
                deadline=now + limit if limit > 0 else 0.0, enqueued=now, headers=headers,
                parts=parts, kind=kind,
            )  # fmt: skip
            frame = request.frame()
            checked = "" if attempt == _ATTEMPTS - 1 else str(revision)
            pushed = int(self._push(
                keys=[keys.online_queue(spec.model_name, spec.version),
                      keys.workers(spec.model_name, spec.version), keys.REVISION],
                args=[frame, spec.job_queue_size, keys.worker(""), checked, *_SERVING_STATES],
            ))  # fmt: skip
            if pushed != _STALE:
                break
        if pushed == _NO_WORKER:
            raise NoWorker("no worker")
        if pushed == _QUEUE_FULL:
            raise QueueFull("queue full")
        reply = self._await(request, frame)
        queued = max(reply.dequeued - now, 0.0) if reply.dequeued else 0.0
        return Delivery(reply, queued, spec.version)

    def _await(self, request: Request, frame: bytes) -> Reply:
        """Block for the reply for as long as the request is alive (see the module doc)."""
        key = keys.reply(request.id)
        verdict = 1
        outage = _Outage()

        def still_alive() -> bool:
            nonlocal verdict
            with outage.tolerated():
                verdict = int(self._alive(
                    keys=[key, keys.online_queue(request.model, request.version),
                          keys.workers(request.model, request.version)],
                    args=[frame, keys.worker(""), keys.inflight(""), *_SERVING_STATES],
                ))  # fmt: skip
            return verdict == 1

        def pop(seconds: float) -> bytes | None:
            popped = None
            with outage.tolerated(pause=seconds):
                popped = self._r.blpop([key], timeout=seconds)
            if popped is None:
                return None
            frame = popped[1]
            return frame if isinstance(frame, bytes) else frame.encode()

        answer = block_for(pop, float("inf"), still_alive)
        if answer is None:
            if verdict == _NO_WORKER:
                raise NoWorker("no worker left")
            raise InternalServerException("Worker died.")
        reply = Reply.parse(answer)
        if reply.error is not None and reply.reason == VERSION_GONE:
            raise NoWorker("version unregistered")
        return reply


class _Outage:
    """Rides out a Redis outage while a request waits: the request lives on in Redis
    (its frame, its worker's in-flight list) and its reply is kept when Redis returns.

    Connection errors are swallowed (after a pause, so a dead Redis is not hammered)
    until the outage has lasted :data:`REDIS_OUTAGE_WAIT` seconds; then the error goes
    up and the client gets the ports' 503.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: float | None = None

    @contextlib.contextmanager
    def tolerated(self, pause: float = OUTAGE_PAUSE) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError):
            now = self._clock()
            self._since = now if self._since is None else self._since
            if now - self._since >= REDIS_OUTAGE_WAIT:
                raise
            time.sleep(min(pause, OUTAGE_PAUSE))
        else:
            self._since = None
