"""The worker side of the request path: TorchServe's batching over Redis lists.

:class:`Batcher` mirrors TorchServe's ``Model.pollInferJob``: block for the first
request, then take up to ``batch_size - 1`` more, waiting at most ``max_batch_delay``
milliseconds measured from when the first was taken. Requests move atomically
(BLMOVE/LMOVE) from the model's queue into this worker's in-flight list, so a request
is never lost: if the worker dies, the supervisor answers what is in that list.

:class:`ModelRunner` serialises access to the model between this loop and Celery tasks
(batch jobs), which is how jobs share a worker fairly with online requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import redis

from control import keys
from control.envelope import FrameError, Reply, Request
from control.redis_io import block_seconds
from workers.handling.types import HandlerFailure, InferenceReply, InferenceRequest, Parameter

log = logging.getLogger(__name__)

#: Reply lists outlive an absent client by this much, then expire.
REPLY_TTL_MS = 60_000
#: The error for a request older than its model's ``clientTimeoutInMills`` when taken.
EXPIRED = "Request timed out in the queue (clientTimeoutInMills)."
#: How often an idle loop wakes to check whether it should stop.
IDLE_WAKE = 0.25
#: How late Redis may answer a blocking call's timeout at its default ``hz`` of 10 (one
#: timer tick, plus margin); the end of a batching window is polled instead, in
#: POLL_STEP steps. :func:`block_slack` derives it from the server's actual ``hz``.
BLOCK_SLACK = 0.11
POLL_STEP = 0.001


def block_slack(client: redis.Redis) -> float:
    """One timer tick of this Redis (``1 / hz``) plus 10 ms; the default when unreadable."""
    try:
        reply: dict[Any, Any] = dict(client.config_get("hz"))
        hz = float(reply.get("hz") or reply.get(b"hz") or 10)
    except (redis.RedisError, ValueError):
        return BLOCK_SLACK  # CONFIG may be denied to this user (ACL)
    return 1.0 / max(hz, 1.0) + 0.01


class Batcher:
    """Takes batches of request frames for one worker. Not thread-safe: one per loop."""

    def __init__(
        self,
        client: redis.Redis,
        queue: str,
        inflight: str,
        batch_size: int,
        max_batch_delay_ms: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        slack: float = BLOCK_SLACK,
    ) -> None:
        self._r = client
        self._sleep = sleep
        self._slack = slack
        self._queue = queue
        self._inflight = inflight
        self._size = max(batch_size, 1)
        self._delay = max(max_batch_delay_ms, 0) / 1000.0
        self._clock = clock

    def next_batch(self, wait: float) -> list[bytes]:
        """Up to ``batch_size`` frames; ``[]`` when none came within ``wait`` seconds
        (``wait`` at most :data:`control.redis_io.BLOCK_CHUNK`)."""
        first = self._take(wait)
        if first is None:
            return []
        batch: list[bytes] = [first]
        deadline = self._clock() + self._delay
        while len(batch) < self._size:
            frame = _frame(self._r.lmove(self._queue, self._inflight, "RIGHT", "LEFT"))
            if frame is not None:
                batch.append(frame)
                continue
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            if remaining > self._slack:
                # Redis checks blocking timeouts only on its timer (every 100 ms at the
                # default hz 10), so block only for the part of the window that a late
                # wake-up cannot overrun; a push still wakes us at once.
                frame = self._take(remaining - self._slack)
                if frame is not None:
                    batch.append(frame)
            else:
                self._sleep(min(POLL_STEP, remaining))
        return batch

    def _take(self, timeout: float) -> bytes | None:
        # Never longer than one BLOCK_CHUNK (the caller's loop asks again), never 0 (which
        # Redis reads as "forever"). Redis takes fractional timeouts; redis-py's stubs say
        # int but pass it through.
        timeout_arg: Any = block_seconds(timeout)
        return _frame(self._r.blmove(self._queue, self._inflight, timeout_arg, "RIGHT", "LEFT"))


def _frame(value: Any) -> bytes | None:
    """A frame as bytes (the client must not decode responses)."""
    if value is None or isinstance(value, bytes):
        return value
    raise TypeError("request frames need a Redis client with decode_responses=False")


class Handles(Protocol):
    """What runs a batch (``workers.handling.LoadedModel``, or a :class:`ModelRunner`)."""

    def handle(self, batch: list[InferenceRequest]) -> list[InferenceReply]: ...


class ModelRunner:
    """One model, shared by the online loop and Celery tasks, one batch at a time.

    ``busy`` (the worker's :meth:`Reporter.busy`) marks the worker BUSY while a batch
    runs, which is what the supervisor's response timeout watches.
    """

    def __init__(
        self,
        model: Handles,
        busy: Callable[[], AbstractContextManager[None]] | None = None,
        observe: Callable[[int, list[Any]], None] | None = None,
    ) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._busy = busy or nullcontext
        self._observe = observe

    def handle(self, batch: list[InferenceRequest]) -> list[InferenceReply]:
        """Run one batch; raises HandlerFailure when the whole batch fails.

        ``observe(batch size, the handler's metric records)`` runs after each batch.
        """
        with self._lock, self._busy():
            try:
                return self._model.handle(batch)
            finally:
                if self._observe is not None:
                    self._observe(len(batch), list(getattr(self._model, "last_metrics", [])))


def to_inference_request(request: Request) -> InferenceRequest:
    """The handling layer's view of a queued request."""
    headers = dict(request.headers)
    if request.kind == "describe":
        headers["describe"] = "True"
    return InferenceRequest(
        request_id=request.id,
        headers=headers,
        parameters=[Parameter(p.name, p.content_type, p.value) for p in request.parts],
    )


def to_reply(reply: InferenceReply, dequeued: float) -> Reply:
    return Reply(
        status=reply.status,
        body=reply.body,
        reason=reply.reason,
        headers=dict(reply.headers),
        content_type=reply.content_type,
        dequeued=dequeued,
    )


class OnlineLoop:
    """Serves the online queue of one model version until stopped."""

    def __init__(
        self,
        client: redis.Redis,
        runner: ModelRunner,
        batcher: Batcher,
        inflight: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._r = client
        self._runner = runner
        self._batcher = batcher
        self._inflight = inflight
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqserve-online", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> bool:
        """Take no new requests from now on; never blocks (safe in a signal handler).

        Returns False when a stop was already requested.
        """
        if self._stop.is_set():
            return False
        self._stop.set()
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests and wait until the batch in progress is answered."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frames = self._batcher.next_batch(IDLE_WAKE)
                if frames:
                    self.serve(frames)
            except redis.RedisError as exc:
                log.error("online loop: Redis error, retrying: %s", exc)
                self._stop.wait(0.5)

    def serve(self, frames: list[bytes]) -> None:
        """Answer one batch of frames taken from the queue."""
        now = self._clock()
        live: list[tuple[bytes, Request]] = []
        pipe = self._r.pipeline(transaction=False)
        for frame in frames:
            try:
                request = Request.parse(frame)
            except FrameError as exc:
                log.error("dropping a malformed request frame: %s", exc)
                pipe.lrem(self._inflight, 1, frame)  # type: ignore[arg-type]  # bytes are fine
                continue
            if 0 < request.deadline < now:
                # Older than the model's clientTimeoutInMills: not run. TorchServe drops it
                # without a word; the waiting client is told instead of left hanging.
                _push_reply(pipe, request.id, Reply(status=408, error=EXPIRED, dequeued=now))
                pipe.lrem(self._inflight, 1, frame)  # type: ignore[arg-type]  # bytes are fine
                continue
            live.append((frame, request))
        pipe.execute()
        # Describe requests are always a batch of one, as in TorchServe.
        predicts = [item for item in live if item[1].kind != "describe"]
        for group in [predicts, *([item] for item in live if item[1].kind == "describe")]:
            if group:
                self._answer(group, now)

    def _answer(self, group: list[tuple[bytes, Request]], dequeued: float) -> None:
        batch = [to_inference_request(request) for _, request in group]
        try:
            replies = [to_reply(r, dequeued) for r in self._runner.handle(batch)]
        except HandlerFailure as exc:
            replies = [Reply(status=exc.status, error=exc.message, dequeued=dequeued)] * len(group)
        pipe = self._r.pipeline(transaction=False)
        for (frame, request), reply in zip(group, replies, strict=True):
            # The reply before the LREM: a waiting API never sees the request nowhere.
            _push_reply(pipe, request.id, reply)
            pipe.lrem(self._inflight, 1, frame)  # type: ignore[arg-type]  # bytes are fine
        pipe.execute()


def _push_reply(pipe: Any, request_id: str, reply: Reply) -> None:
    key = keys.reply(request_id)
    pipe.lpush(key, reply.frame())
    pipe.pexpire(key, REPLY_TTL_MS)


def answer_all(client: redis.Redis, inflight: str, status: int, message: str) -> int:
    """Answer every request left in an in-flight list with an error; returns the count.

    Used by the supervisor for a worker that died: TorchServe answers the batch it was
    running with ``Worker died.``; nothing is silently lost or run twice.
    """
    frames = client.lrange(inflight, 0, -1)
    pipe = client.pipeline(transaction=False)
    for frame in frames:
        try:
            request = Request.parse(frame if isinstance(frame, bytes) else frame.encode())
        except FrameError:
            continue
        _push_reply(pipe, request.id, Reply(status=status, error=message))
    pipe.delete(inflight)
    pipe.execute()
    return len(frames)
