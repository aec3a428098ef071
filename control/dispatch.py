"""The API side of the request path: put a request on its model's queue, await the reply.

One request costs two Redis round trips here: a Lua script that checks for a worker
and the queue bound and pushes the frame (one atomic step), and a blocking pop of the
reply list (no polling: the reply wakes the waiting thread). Workers take frames
with BLMOVE, answer with LPUSH, and the supervisor answers for workers that die.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from control import keys
from control.envelope import Part, Reply, Request
from control.errors import InternalServerException, ServiceUnavailableException
from control.registry import Registry, VersionRecord

# KEYS: requests list, workers index   ARGV: frame, capacity, worker key prefix
_PUSH = """
local alive = false
for _, wid in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local state = redis.call('HGET', ARGV[3] .. wid, 'state')
  if state then
    if state ~= 'DRAINING' then alive = true break end
  else
    redis.call('SREM', KEYS[2], wid)
  end
end
if not alive then return -1 end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -2 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""

#: Seconds the API waits beyond ``response_timeout`` for the supervisor to answer for a
#: worker that died, before answering "Worker died." itself.
REPLY_GRACE = 5.0
#: How long a spec stays cached per process; a changed registration is seen this late.
SPEC_TTL = 1.0


class NoWorker(ServiceUnavailableException):
    """The model version has no worker at all (none registered, none starting)."""


class QueueFull(ServiceUnavailableException):
    """The model's queue is at ``job_queue_size``."""


@dataclass(frozen=True)
class Outcome:
    """A reply and how long the request queued (for metrics)."""

    reply: Reply
    queue_seconds: float


class Dispatcher:
    """Sends requests to model workers; thread-safe, one per API process.

    ``client`` must return bytes (``decode_responses=False``): frames carry raw bytes.
    """

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self._r = client
        self._clock = clock
        self._push = client.register_script(_PUSH)
        self._registry = Registry(client)
        self._specs: dict[tuple[str, str | None], tuple[float, VersionRecord]] = {}

    def lookup(self, model: str, version: str | None) -> VersionRecord:
        """The registered version (default if None); TorchServe's 404s when unknown."""
        now = time.monotonic()
        cached = self._specs.get((model, version))
        if cached is not None and cached[0] > now:
            return cached[1]
        record = self._registry.get(model, version)
        self._specs[(model, version)] = (now + SPEC_TTL, record)
        return record

    def send(
        self,
        record: VersionRecord,
        parts: tuple[Part, ...],
        headers: dict[str, str],
        request_id: str | None = None,
        kind: str = "predict",
    ) -> Outcome:
        """Queue one request and wait for its reply.

        Raises ServiceUnavailableException (no worker), :class:`QueueFull`, or
        InternalServerException("Worker died.") when no reply comes in time.
        """
        spec = record.spec
        rid = request_id or uuid.uuid4().hex
        now = self._clock()
        request = Request(
            id=rid, model=spec.model_name, version=spec.version,
            deadline=now + spec.response_timeout, enqueued=now, headers=headers,
            parts=parts, kind=kind,
        )  # fmt: skip
        pushed = int(self._push(
            keys=[keys.requests(spec.model_name, spec.version),
                  keys.workers(spec.model_name, spec.version)],
            args=[request.frame(), spec.job_queue_size, keys.worker("")],
        ))  # fmt: skip
        if pushed == -1:
            raise NoWorker("no worker")
        if pushed == -2:
            raise QueueFull("queue full")
        popped = self._r.blpop([keys.reply(rid)], timeout=spec.response_timeout + REPLY_GRACE)
        if popped is None:
            raise InternalServerException("Worker died.")
        frame = popped[1]
        reply = Reply.parse(frame if isinstance(frame, bytes) else frame.encode())
        queued = max(reply.dequeued - now, 0.0) if reply.dequeued else 0.0
        return Outcome(reply, queued)
