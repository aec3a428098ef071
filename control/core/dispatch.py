"""The API side of the request path: put a request on its model's queue, await the reply.

Asynchronous, one :class:`Dispatcher` per API process and event loop. A request costs
one Redis round trip to enqueue, and no thread and no connection while it waits:

* **Enqueue** (:data:`_PUSH`, one Lua script): resolve the version (the default when
  none is named) from the registry itself, check that a worker can take it (the one
  liveness rule, :data:`control.core.observed.SERVING`), enforce ``job_queue_size``, and
  push the frame. Nothing is cached: a request is routed by the registry as it is when
  the script runs, so once a set-default, scale or unregister call has returned, every
  later request is routed by the new state (read your writes).
* **Replies**: every request frame names this process's reply list
  (``keys.replies(listener)``, ``reply_to``); workers push each reply there with its
  request id. One listener task per process pops them in batches (BLMPOP) and resolves
  the waiting requests' futures. The listener survives Redis errors (it pauses and
  reconnects); a reply for nobody (its request already answered) is dropped.
* **Streams** (:meth:`Dispatcher.stream`): a handler that streams
  (``send_intermediate_predict_response``) answers one request with several replies,
  intermediate pieces (``Reply.more``) then the final reply, pushed to the same reply
  list as they are produced. A streaming caller's request gets a queue of pieces (:class:`_Pieces`)
  instead of a future, fed by the same listener, and is handed each piece as it comes
  (nothing buffers the whole answer); the liveness rule below applies while it waits
  for each piece (its worker holds the request until the final reply). A caller that
  stops reading before the end sets the request's cancel key (``keys.cancel``): the
  worker's next piece for it sees it and the handler is stopped. A plain
  :meth:`Dispatcher.send` caller gets the first reply, as TorchServe's unary calls do
  (gRPC ``Predictions`` answers a streaming handler with its first piece): a piece
  with ``more`` set, whose successors are dropped as replies for nobody.

How long a request waits. As TorchServe: a request waits in the queue for as long as a
worker that can take it exists, then its worker has ``response_timeout`` seconds for
the batch, after which the supervisor kills the worker and answers "Worker died.".
The API therefore sets no timeout of its own. Every
:data:`control.core.redis_io.BLOCK_CHUNK` seconds a waiting request asks Redis, in one
script (:data:`_ALIVE`), whether it is still alive: its reply is waiting in the reply
list, a live worker holds it, or it is queued while a worker can take it. A request
left queued when no worker can take it any more is taken off the queue and answered
503 at once; a request found nowhere is answered "Worker died." (its host vanished, or
Redis restarted without its data) once the listener has finished the pop in progress
(a reply the listener has just popped is not in the list any more, and not resolved
yet). Requests still queued when their version is unregistered are answered 503 by the
unregister itself (:func:`refuse_queued`).

A Redis outage: a waiting request rides it out for :data:`REDIS_OUTAGE_WAIT` seconds
(its frame and its worker's in-flight list live on in Redis, and its reply is kept),
then is answered 503; an enqueue that fails goes up at once (the ports answer 503).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio

from control.core import keys
from control.core.envelope import (
    FrameError,
    Part,
    Reply,
    Request,
    reply_address,
    reply_prefix,
)
from control.core.errors import (
    InternalServerException,
    ModelNotFoundException,
    ModelVersionNotFoundException,
    ServiceUnavailableException,
)
from control.core.observed import SERVING
from control.core.redis_io import BLOCK_CHUNK

log = logging.getLogger(__name__)

_SERVING_STATES = sorted(state.value for state in SERVING)

# Key names come from control.core.keys as prefixes (ARGV), completed here with the
# version the script resolves: one Redis, not a cluster.
# ARGV: model, version ('' = the default), frame ('' = resolve only), model key,
#       version key prefix, workers key prefix, queue key prefix, worker key prefix,
#       serving states...
# Returns {code, version}: code >= 0 pushed (0 when resolving only), -1 no worker,
# -2 queue full, -4 no such model, -5 no such version.
_PUSH = """
local ver = ARGV[2]
if ver == '' then
  ver = redis.call('HGET', ARGV[4], 'default')
  if not ver then return {-4, ''} end
end
local spec = redis.call('HGET', ARGV[5] .. ver, 'spec')
if not spec then
  if redis.call('EXISTS', ARGV[4]) == 0 then return {-4, ver} end
  return {-5, ver}
end
if ARGV[3] == '' then return {0, ver} end
local serving = {}
for i = 9, #ARGV do serving[ARGV[i]] = true end
local index = ARGV[6] .. ver
local alive = false
for _, wid in ipairs(redis.call('SMEMBERS', index)) do
  local state = redis.call('HGET', ARGV[8] .. wid, 'state')
  if state then
    if serving[state] then alive = true break end
  else
    redis.call('SREM', index, wid)
  end
end
if not alive then return {-1, ver} end
local queue = ARGV[7] .. ver
local capacity = tonumber(cjson.decode(spec)['job_queue_size']) or 100
if redis.call('LLEN', queue) >= capacity then return {-2, ver} end
return {redis.call('LPUSH', queue, ARGV[3]), ver}
"""

# KEYS: reply list, online queue, workers index
# ARGV: frame, worker key prefix, in-flight key prefix, reply header prefix,
#       serving states...
# 1: alive (its reply waits in the list, held by a live worker, or queued while a
# worker can take it); -1: queued with no worker left that can take it (taken off the
# queue); 0: found nowhere.
_ALIVE = """
local n = #ARGV[4]
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.sub(item, 5, 4 + n) == ARGV[4] then return 1 end
end
local serving = {}
for i = 5, #ARGV do serving[ARGV[i]] = true end
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

_NO_WORKER, _QUEUE_FULL, _NO_MODEL, _NO_VERSION = -1, -2, -4, -5
#: The ``reason`` of the reply :func:`refuse_queued` gives a queued request: the
#: waiting API answers it as it answers "no worker" (TorchServe's 503).
VERSION_GONE = "version unregistered"
#: How long a waiting request rides out a Redis outage before it is answered 503.
REDIS_OUTAGE_WAIT = 30.0
#: Pause between attempts while Redis is unreachable.
OUTAGE_PAUSE = 0.5
#: Most replies one listener pop takes.
LISTEN_BATCH = 256


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


def _raise_missing(code: int, model: str, version: str) -> None:
    """The registry's 404s, in its words (``control.core.registry``)."""
    if code == _NO_MODEL:
        raise ModelNotFoundException(f"Model not found: {model}")
    if code == _NO_VERSION:
        raise ModelVersionNotFoundException(
            f"Model version: {version} does not exist for model: {model}"
        )


class Dispatcher:
    """Sends requests to model workers and awaits their replies (see the module doc).

    ``client`` must return bytes (``decode_responses=False``): frames carry raw bytes.
    Use it from one event loop; its listener task starts with the first request.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        clock: Callable[[], float] = time.time,
        listener: str | None = None,
    ) -> None:
        self._r = client
        self._clock = clock
        #: 128 random bits: no two API processes share a reply list.
        self.listener_id = listener or secrets.token_hex(16)
        self.replies = keys.replies(self.listener_id)
        self._push = _Pipelined(client, _PUSH)
        self._alive = client.register_script(_ALIVE)
        #: Requests awaiting replies: a future (one reply) or a queue (a stream's pieces).
        self._waiting: dict[str, asyncio.Future[Reply] | _Pieces] = {}
        #: Cancel-key writes in flight (strong references until done).
        self._cancels: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Done when the listener's pop in progress has been handled (see _found_nowhere).
        self._round: asyncio.Future[None] | None = None

    # -- routing --------------------------------------------------------------------

    def _route_args(self, model: str, version: str | None, frame: bytes) -> list[Any]:
        return [
            model, version or "", frame, keys.model(model), keys.version(model, ""),
            keys.workers(model, ""), keys.online_queue(model, ""), keys.worker(""),
            *_SERVING_STATES,
        ]  # fmt: skip

    async def lookup(self, model: str, version: str | None) -> str:
        """The registered version (the default when None); TorchServe's 404s when unknown."""
        code, resolved = await self._push(self._route_args(model, version, b""))
        ver = _text(resolved)
        _raise_missing(int(code), model, ver)
        return ver

    async def send(
        self,
        model: str,
        version: str | None,
        parts: tuple[Part, ...],
        headers: dict[str, str],
        request_id: str | None = None,
        kind: str = "predict",
    ) -> Delivery:
        """Queue one request for ``model`` (``version``, or the default) and await its reply.

        Raises the registry's 404s, :class:`NoWorker`, :class:`QueueFull`, or
        InternalServerException("Worker died.") when the request was lost. The worker
        applies the model's ``clientTimeoutInMills`` (the frame's deadline is 0: this
        side does not read the model's spec).
        """
        request = self._request(model, version, parts, headers, request_id, kind)
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        # Registered before the push: the reply can be popped before the push's answer
        # is read.
        self._waiting[request.id] = waiter
        try:
            ver, frame = await self._enqueue(request, version)
            reply = await self._await(
                request, ver, frame, lambda: asyncio.shield(waiter), waiter.done
            )
        finally:
            self._waiting.pop(request.id, None)
        return _delivery(reply, request, ver)

    def _request(
        self,
        model: str,
        version: str | None,
        parts: tuple[Part, ...],
        headers: dict[str, str],
        request_id: str | None,
        kind: str,
    ) -> Request:
        """The request as it travels, answered on this process's reply list."""
        self._ensure_listener()
        return Request(
            id=request_id or uuid.uuid4().hex, model=model, version=version or "",
            deadline=0.0, enqueued=self._clock(), headers=headers, parts=parts, kind=kind,
            reply_to=self.replies,
        )  # fmt: skip

    async def _enqueue(self, request: Request, version: str | None) -> tuple[str, bytes]:
        """Push ``request`` (the one round trip); the version it went to and its frame.
        Raises the registry's 404s, :class:`NoWorker` or :class:`QueueFull`."""
        frame = request.frame()
        code, resolved = await self._push(self._route_args(request.model, version, frame))
        ver = _text(resolved)
        code = int(code)
        _raise_missing(code, request.model, ver)
        if code == _NO_WORKER:
            raise NoWorker("no worker")
        if code == _QUEUE_FULL:
            raise QueueFull("queue full")
        return ver, frame

    async def stream(
        self,
        model: str,
        version: str | None,
        parts: tuple[Part, ...],
        headers: dict[str, str],
        request_id: str | None = None,
        kind: str = "predict",
    ) -> AsyncGenerator[Delivery, None]:
        """Queue one request as :meth:`send` does and yield its replies as they come.

        Yields each intermediate piece (``reply.more`` True), then the final reply
        (``more`` False, or an error reply, which ends a stream too) and stops; an
        answer that does not stream is one delivery, the final one. Raises what
        :meth:`send` raises, before the first delivery or while waiting for a later
        one (``Worker died.`` when the worker is lost mid-stream). ``kind="stream"``
        asks the worker to run the request as a batch of one.

        Closing the iterator before the final reply (``aclose``, or a consumer that
        goes away) forgets the request, whose later pieces are dropped, and sets its
        cancel key so that the worker stops the handler at its next piece.
        """
        request = self._request(model, version, parts, headers, request_id, kind)
        pieces = _Pieces()
        self._waiting[request.id] = pieces  # before the push, as in send
        queued_ok, finished = False, False
        try:
            ver, frame = await self._enqueue(request, version)
            queued_ok = True
            while not finished:
                reply = await self._await(request, ver, frame, pieces.get, pieces.arrived)
                finished = not reply.more or reply.error is not None
                yield _delivery(reply, request, ver)
        finally:
            self._waiting.pop(request.id, None)
            if queued_ok and not finished:
                self._cancel(request.id)

    def _cancel(self, request_id: str) -> None:
        """Set ``request_id``'s cancel key, in the background: called where awaiting
        is not possible (a closing generator), and nobody waits for the outcome."""

        async def write() -> None:
            try:
                await self._r.set(keys.cancel(request_id), b"1", px=keys.REPLY_TTL_MS)
            except redis.RedisError as exc:  # the stream then runs to its end, unread
                log.warning("could not cancel stream %s: %s", request_id, exc)

        try:
            task = asyncio.get_running_loop().create_task(write())
        except RuntimeError:  # no loop any more (a generator closed at shutdown)
            return
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _await(
        self,
        request: Request,
        ver: str,
        frame: bytes,
        get: Callable[[], Awaitable[Reply]],
        arrived: Callable[[], bool],
    ) -> Reply:
        """The next reply (``get``; ``arrived``: whether one is there to get), checking
        every BLOCK_CHUNK seconds that the request lives."""
        outage = _Outage()
        while True:
            try:
                return await asyncio.wait_for(get(), BLOCK_CHUNK)
            except TimeoutError:
                pass
            verdict = 1
            async with outage.tolerated():
                verdict = await self._check(request, ver, frame)
            if verdict == 1 or arrived():
                continue
            if verdict == -1:
                raise NoWorker("no worker left")
            if not await self._found_nowhere(arrived):
                continue
            raise InternalServerException("Worker died.")

    async def _check(self, request: Request, ver: str, frame: bytes) -> int:
        return int(
            await self._alive(
                keys=[self.replies, keys.online_queue(request.model, ver),
                      keys.workers(request.model, ver)],
                args=[frame, keys.worker(""), keys.inflight(""), reply_prefix(request.id),
                      *_SERVING_STATES],
            )
        )  # fmt: skip

    async def _found_nowhere(self, arrived: Callable[[], bool]) -> bool:
        """After a "found nowhere" verdict: True when the reply still has not come once
        the listener has handled the pop it had in progress (which may hold it)."""
        current = self._round
        if current is not None and not current.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(current)
        return not arrived()

    # -- the reply listener ---------------------------------------------------------

    def _ensure_listener(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._task = loop.create_task(self._listen(), name="mqserve-reply-listener")

    async def _listen(self) -> None:
        """Pop this process's replies and resolve their requests, until cancelled."""
        failing_since: float | None = None
        while True:
            loop = asyncio.get_running_loop()
            self._round = loop.create_future()
            try:
                popped = await self._r.blmpop(
                    BLOCK_CHUNK, 1, self.replies, direction="RIGHT", count=LISTEN_BATCH
                )
                failing_since = None
                if popped:
                    # BLMPOP's answer: [list name, [frames...]].
                    self._resolve(cast(list[bytes], popped[1]))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("reply listener: Redis unavailable (%s); retrying", exc)
                await asyncio.sleep(OUTAGE_PAUSE)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug: log it, never let the listener die
                log.exception("reply listener: unexpected error")
                await asyncio.sleep(OUTAGE_PAUSE)
            finally:
                if not self._round.done():
                    self._round.set_result(None)

    def _resolve(self, frames: list[bytes]) -> None:
        for frame in frames:
            try:
                reply = Reply.parse(frame)
            except FrameError as exc:
                log.error("reply listener: dropping a malformed reply: %s", exc)
                continue
            waiter = self._waiting.get(reply.id)
            if isinstance(waiter, _Pieces):
                waiter.put(reply)  # a stream: every piece, in order
            elif waiter is not None and not waiter.done():
                waiter.set_result(reply)

    async def close(self) -> None:
        """Stop the listener (an API process shutting down); returns once it has stopped."""
        task, self._task = self._task, None
        if task is None:
            return
        if task.get_loop() is not asyncio.get_running_loop():
            task.cancel()  # another (or a closed) loop's task: nothing to wait for here
            return
        # Cancel until it has stopped: on Python 3.11, asyncio.wait_for (redis-py sends
        # every command through it) swallows a cancellation that lands just as its inner
        # future completes, and the listener would pop on. The caller's own cancellation
        # is not swallowed here (asyncio.wait raises it).
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=OUTAGE_PAUSE)


class _Pieces:
    """The replies of one streaming request, in order: put by the listener, got by the
    streaming caller. Like an ``asyncio.Queue``, but :meth:`get` hands out a plain
    future (a timeout that cancels it loses nothing), so waiting for a piece with a
    timeout creates no task: every prediction of the inference port waits this way."""

    def __init__(self) -> None:
        self._items: collections.deque[Reply] = collections.deque()
        self._getter: asyncio.Future[Reply] | None = None

    def put(self, reply: Reply) -> None:
        getter, self._getter = self._getter, None
        if getter is not None and not getter.done():
            getter.set_result(reply)
        else:
            self._items.append(reply)

    def arrived(self) -> bool:
        """Whether a piece is there for :meth:`get` to hand out at once."""
        return bool(self._items)

    def get(self) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.popleft())
        else:
            self._getter = future
        return future


class _Pipelined:
    """One Lua script (no KEYS) called by many coroutines, the calls of one event-loop
    iteration sent as one pipeline: under load the requests that arrived together cost
    one write and one read, not one each (auto-pipelining). A lone call (a quiet server)
    is sent at once, as the plain script call it is; nothing waits for a batch to fill.

    Each caller gets its own result or exception; a connection error fails the calls of
    its batch (the ports answer 503), as it would fail them one by one.
    """

    def __init__(self, client: redis.asyncio.Redis, source: str) -> None:
        self._r = client
        self._script = client.register_script(source)
        self._queued: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sha(self) -> str:
        """The script's SHA1, as EVALSHA names it."""
        return str(self._script.sha)

    async def __call__(self, args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((args, future))
        if len(self._queued) == 1:
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queued = self._queued, []
        task = loop.create_task(self._send(batch))
        self._tasks.add(task)  # a strong reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                results: list[Any] = [await self._script(keys=[], args=batch[0][0])]
            else:
                results = await self._pipeline([args for args, _ in batch])
        except BaseException as exc:  # handed to every caller of the batch
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _pipeline(self, calls: list[list[Any]]) -> list[Any]:
        for attempt in range(2):
            pipe = self._r.pipeline(transaction=False)
            for args in calls:
                pipe.evalsha(self._script.sha, 0, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, redis.exceptions.NoScriptError) for r in results):
                # Redis restarted (its script cache is empty): load it, send them again.
                await self._r.script_load(self._script.script)
                continue
            return results
        return results


def _delivery(reply: Reply, request: Request, version: str) -> Delivery:
    """``reply`` as its caller gets it; an unregister's answer to a queued request is
    TorchServe's "no worker" (503)."""
    if reply.error is not None and reply.reason == VERSION_GONE:
        raise NoWorker("version unregistered")
    queued = max(reply.dequeued - request.enqueued, 0.0) if reply.dequeued else 0.0
    return Delivery(reply, queued, version)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def refuse_queued(client: redis.Redis, model: str, version: str) -> int:
    """Answer every request queued for ``model``/``version`` with "no worker" (503)
    and empty its online queue; returns how many were answered.

    Called while the version is being unregistered (its workers told to stop take
    nothing more): the waiting requests are answered now, not at their next liveness
    check. ``client`` returns bytes. A frame whose id cannot be read is just dropped.
    """
    queue = keys.online_queue(model, version)
    pipe = client.pipeline(transaction=True)
    pipe.lrange(queue, 0, -1)
    pipe.delete(queue)
    frames, _ = pipe.execute()
    reply = Reply(status=503, reason=VERSION_GONE, error=VERSION_GONE)
    pipe = client.pipeline(transaction=False)
    for frame in frames:
        address = reply_address(frame if isinstance(frame, bytes) else str(frame).encode())
        if address is not None:
            rid, key = address
            pipe.lpush(key, reply.to(rid).frame())
            pipe.pexpire(key, keys.REPLY_TTL_MS)
    pipe.execute()
    return len(frames)


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

    @contextlib.asynccontextmanager
    async def tolerated(self) -> AsyncIterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError):
            now = self._clock()
            self._since = now if self._since is None else self._since
            if now - self._since >= REDIS_OUTAGE_WAIT:
                raise
            await asyncio.sleep(OUTAGE_PAUSE)
        else:
            self._since = None
