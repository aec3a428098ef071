"""The worker side of the request path: TorchServe's batching over Redis lists.

:class:`Batcher` mirrors TorchServe's ``Model.pollInferJob``: block for the first
request, then take up to ``batch_size - 1`` more, waiting at most ``max_batch_delay``
milliseconds measured from when the first was taken. Requests move atomically
(BLMOVE, or a Lua script of LMOVEs) from the model's queue into this worker's in-flight
list, so a request is never lost: if the worker dies, the supervisor answers what is in
that list.

Round trips per batch, the hot path: the rest of a batch that is already queued comes
in ONE call (:data:`_TAKE_QUEUED`), whatever its size; the replies, the in-flight
acknowledgement and the first frame of the next batch go in ONE pipeline
(:meth:`OnlineLoop._deliver`). A noop request under load thus costs one round trip at
``batch_size`` 1, two per batch above; metrics are recorded after the replies are out.

Replies go where the request frame says (``Request.reply_key``: its API process's shared
list ``reply_to``, else its own ``keys.reply(id)``), always naming the request id
(``Reply.to``), with a TTL (:data:`REPLY_TTL_MS`) so that a reply nobody pops expires.

Streaming: each online batch runs with a :class:`BatchStream`, through which the
handler's ``send_intermediate_predict_response`` pushes intermediate replies
(``Reply.more``) to the same reply lists at once, one pipeline per call, while the batch
is still running; its frames stay in the in-flight list until the final replies are out,
so the waiting API sees the request held all along, and the next batch is taken only
after the last piece (TorchServe's rule). Requests of kind ``stream`` (and ``describe``)
run as batches of one (``envelope.SOLO_KINDS``).

:class:`ModelRunner` serialises access to the model between this loop and Celery tasks
(batch jobs), which is how jobs share a worker fairly with online requests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import redis

from control.core import keys
from control.core.envelope import SOLO_KINDS, FrameError, Reply, Request, reply_address
from control.core.redis_io import SOCKET_TIMEOUT, block_seconds
from workers.handling.types import (
    HandlerFailure,
    InferenceReply,
    InferenceRequest,
    ReplyStream,
    StreamCancelled,
)
from workers.outage import Outage
from workers.worker.messages import to_inference_request, to_reply

log = logging.getLogger(__name__)

#: Reply lists outlive an absent client by this much, then expire.
REPLY_TTL_MS = keys.REPLY_TTL_MS
#: The error for a request older than its model's ``clientTimeoutInMills`` when taken.
EXPIRED = "Request timed out in the queue (clientTimeoutInMills)."
#: How often an idle loop wakes to check whether it should stop.
IDLE_WAKE = 0.25
#: How late Redis may answer a blocking call's timeout at its default ``hz`` of 10 (one
#: timer tick, plus margin); the end of a batching window is polled instead, in
#: POLL_STEP steps. :func:`block_slack` derives it from the server's actual ``hz``.
BLOCK_SLACK = 0.11
POLL_STEP = 0.001
#: The error for a frame that does not parse (its sender is told when its id is readable).
MALFORMED = "Malformed request frame: {}"
#: The error for requests of a batch the loop failed on outside the handler (a bug).
LOOP_FAILED = "Internal Server Error"
#: Pause after an unexpected error in the online loop, so a bug does not spin.
ERROR_PAUSE = 0.5
#: How long a worker keeps trying to deliver the replies of a batch it ran while Redis
#: is unreachable (as long as a waiting API rides out an outage, control.core.dispatch).
REPLY_RETRY_S = 30.0
#: The online loop counts as stuck when it made no progress for this long (plus its
#: batching window) outside the handler (the handler has response_timeout, which the
#: supervisor watches): longer than any one Redis call can take.
STUCK_AFTER = 2 * SOCKET_TIMEOUT


def block_slack(client: redis.Redis) -> float:
    """One timer tick of this Redis (``1 / hz``) plus 10 ms; the default when unreadable."""
    try:
        reply: dict[Any, Any] = dict(client.config_get("hz"))
        hz = float(reply.get("hz") or reply.get(b"hz") or 10)
    except (redis.RedisError, ValueError):
        return BLOCK_SLACK  # CONFIG may be denied to this user (ACL)
    return 1.0 / max(hz, 1.0) + 0.01


# KEYS: queue, in-flight list   ARGV: the most frames to move
# Every frame already queued, up to ARGV[1], moved (oldest first) in one step: a frame is
# in the queue or in the in-flight list at every moment, never in neither.
_TAKE_QUEUED = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local frame = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not frame then break end
  taken[i] = frame
end
return taken
"""


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
        self._take_queued_script = client.register_script(_TAKE_QUEUED)

    @property
    def window(self) -> float:
        """The batching window (``max_batch_delay``) in seconds."""
        return self._delay

    @property
    def size(self) -> int:
        """The most frames in one batch (``batch_size``)."""
        return self._size

    def next_batch(self, wait: float, taken: Sequence[bytes] = ()) -> list[bytes]:
        """Up to ``batch_size`` frames; ``[]`` when none came within ``wait`` seconds
        (``wait`` at most :data:`control.core.redis_io.BLOCK_CHUNK`).

        ``taken``: frames of this batch already in the in-flight list (taken with the
        previous batch's replies, :meth:`prefetch`); the window starts now, with them.
        Round trips: one blocking take for the first frame (none with ``taken``), one
        call for all that are queued, then one blocking take (or, near the end of the
        window, one poll per :data:`POLL_STEP`) per frame that arrives within the
        window, each followed by one call for what arrived meanwhile.
        """
        batch = list(taken[: self._size])
        if not batch:
            first = self._take(wait)
            if first is None:
                return []
            batch.append(first)
        deadline = self._clock() + self._delay
        arrived = True  # whether frames may be queued: then take them all in one call
        while len(batch) < self._size:
            if arrived:
                batch.extend(self.take_queued(self._size - len(batch)))
                if len(batch) >= self._size:
                    break
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            if remaining > self._slack:
                # Redis checks blocking timeouts only on its timer (every 100 ms at the
                # default hz 10), so block only for the part of the window that a late
                # wake-up cannot overrun; a push still wakes us at once.
                frame = self._take(remaining - self._slack)
            else:
                # The end of the window is polled, with the cheapest command (a poll
                # mostly finds nothing); one that finds a frame asks for the rest.
                self._sleep(min(POLL_STEP, remaining))
                frame = _frame(self._r.lmove(self._queue, self._inflight, "RIGHT", "LEFT"))
            arrived = frame is not None
            if frame is not None:
                batch.append(frame)
        return batch

    def take_queued(self, most: int) -> list[bytes]:
        """Up to ``most`` frames already queued, moved into the in-flight list in one
        call (oldest first); ``[]`` when the queue is empty. Never blocks."""
        if most <= 0:
            return []
        taken = self._take_queued_script(keys=[self._queue, self._inflight], args=[most])
        return [frame for frame in (_frame(f) for f in taken or []) if frame is not None]

    def prefetch(self, pipe: Any) -> None:
        """Queue on ``pipe`` the move of the oldest queued frame into the in-flight list
        (its result: the frame or None), so that a batch's reply pipeline also takes the
        first frame of the next batch."""
        pipe.lmove(self._queue, self._inflight, "RIGHT", "LEFT")

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
    """What runs a batch (``workers.handling.LoadedModel``, or a :class:`ModelRunner`);
    ``stream`` receives the intermediate replies of a streaming handler."""

    def handle(
        self, batch: list[InferenceRequest], stream: ReplyStream | None = None
    ) -> list[InferenceReply]: ...


class BatchStream:
    """The :class:`~workers.handling.types.ReplyStream` of one online batch: each call
    pushes its pieces to their requests' reply lists in one pipeline, at once.

    The same pipeline reads each request's cancel key (``keys.cancel``, set by an API
    whose client went away): such a request gets no further piece, and once every
    request of the batch is cancelled (or ended by :meth:`fail`) the next call raises
    :class:`StreamCancelled` so that the handler stops. A Redis error goes up to the
    handler (the batch then fails, and its final replies are delivered as any others).
    ``progress`` runs after each piece (the worker's response timeout starts again).
    """

    def __init__(
        self,
        client: redis.Redis,
        requests: Sequence[Request],
        dequeued: float,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self._r = client
        self._requests = {request.id: request for request in requests}
        self._dequeued = dequeued
        self._progress = progress
        #: Requests whose stream is over (client gone, or a batch-level error sent).
        self._ended: set[str] = set()
        #: Pieces pushed, for logs and tests.
        self.sent = 0

    def pieces(self, replies: dict[str, InferenceReply]) -> None:
        if len(self._ended) >= len(self._requests):
            raise StreamCancelled("every client of this batch went away")
        targets = [
            (rid, reply)
            for rid, reply in replies.items()
            if rid in self._requests and rid not in self._ended
        ]
        if not targets:
            return
        pipe = self._r.pipeline(transaction=False)
        for rid, reply in targets:
            pipe.exists(keys.cancel(rid))
            piece = to_reply(reply, self._dequeued, more=True).to(rid)
            _push_reply(pipe, self._requests[rid].reply_key, piece)
        results = pipe.execute()
        self.sent += len(targets)
        if self._progress is not None:
            self._progress()  # TorchServe's response_timeout is per reply
        # Three results per request: EXISTS, LPUSH, PEXPIRE.
        for (rid, _), cancelled in zip(targets, results[::3], strict=True):
            if cancelled:
                self._ended.add(rid)

    def fail(self, request_ids: list[str], status: int, message: str) -> None:
        targets = [rid for rid in request_ids if rid in self._requests and rid not in self._ended]
        pipe = self._r.pipeline(transaction=False)
        for rid in targets:
            failure = Reply(status=status, error=message, dequeued=self._dequeued).to(rid)
            _push_reply(pipe, self._requests[rid].reply_key, failure)
        pipe.execute()
        self._ended.update(targets)


class Takes(Protocol):
    """What an :class:`OnlineLoop` takes its batches from (a :class:`Batcher`)."""

    @property
    def window(self) -> float: ...

    @property
    def size(self) -> int: ...

    def next_batch(self, wait: float, taken: Sequence[bytes] = ()) -> list[bytes]: ...

    def prefetch(self, pipe: Any) -> None: ...


class ModelRunner:
    """One model, shared by the online loop and Celery tasks, one batch at a time.

    ``busy`` (the worker's :meth:`Reporter.busy`) marks the worker BUSY while a batch
    runs, which is what the supervisor's response timeout watches; it writes nothing to
    Redis (the heartbeat thread publishes the state), so it costs the request path two
    lock operations. ``progress`` (:meth:`Reporter.progress`) restarts that timeout when
    a streaming batch sends a piece.
    """

    def __init__(
        self,
        model: Handles,
        busy: Callable[[], AbstractContextManager[None]] | None = None,
        observe: Callable[[int, list[Any]], None] | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._busy = busy or nullcontext
        self._progress = progress
        self._observe = observe
        #: Observations of batches run with ``defer``, until :meth:`observe_deferred`.
        self._deferred: list[tuple[int, list[Any]]] = []
        #: ``observe`` runs in the online loop's thread and in Celery's, one at a time.
        self._observe_lock = threading.Lock()

    def handle(
        self,
        batch: list[InferenceRequest],
        stream: ReplyStream | None = None,
        defer: bool = False,
    ) -> list[InferenceReply]:
        """Run one batch; raises HandlerFailure when the whole batch fails.

        ``stream``: where the handler's intermediate replies go (the online loop's
        :class:`BatchStream`; None for batch jobs and Celery tasks, which drop them).

        ``observe(batch size, the handler's metric records)`` runs after each batch, or,
        with ``defer``, at the next :meth:`observe_deferred` (the online loop's, once
        the batch's replies are out: metrics are not what its clients wait for).
        """
        with self._lock, self._busy():
            try:
                if stream is None:
                    return self._model.handle(batch)
                return self._model.handle(batch, stream=stream)
            finally:
                if self._observe is not None:
                    records = list(getattr(self._model, "last_metrics", []))
                    if defer:
                        self._deferred.append((len(batch), records))
                    else:
                        with self._observe_lock:
                            self._observe(len(batch), records)

    def progress(self) -> None:
        """A piece of the running batch went out: its response timeout starts again."""
        if self._progress is not None:
            self._progress()

    def observe_deferred(self) -> None:
        """Observe every batch run with ``defer`` since the last call, in order."""
        if self._observe is None:
            return
        with self._observe_lock:
            while self._deferred:
                size, records = self._deferred.pop(0)
                try:
                    self._observe(size, records)
                except Exception:  # metrics must never cost a request or stop the loop
                    log.exception("metrics of a batch dropped")


class OnlineLoop:
    """Serves the online queue of one model version until stopped.

    ``client_timeout_ms`` is the model's ``clientTimeoutInMills``: a request taken more
    than that after it was enqueued is answered 408 :data:`EXPIRED` and not run (0: no
    limit). A frame's own ``deadline`` (> 0) takes precedence; an API that does not
    know the model's spec sends 0, and the worker, which does, applies the limit. The
    frame's ``version`` is not read: the frame sits on this version's queue.
    """

    def __init__(
        self,
        client: redis.Redis,
        runner: ModelRunner,
        batcher: Takes,
        inflight: str,
        clock: Callable[[], float] = time.time,
        client_timeout_ms: int = 0,
    ) -> None:
        self._r = client
        self._runner = runner
        self._batcher = batcher
        self._inflight = inflight
        self._clock = clock
        self._client_timeout = max(client_timeout_ms, 0) / 1000.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqserve-online", daemon=True)
        #: Monotonic time of the loop's last sign of life, and whether it is in the
        #: handler (whose own limit is response_timeout, watched by the supervisor).
        self._progress = time.monotonic()
        self._handling = False
        #: Frames answered because they did not parse (for logs and tests).
        self.malformed = 0

    def start(self) -> None:
        self._thread.start()

    def failure(self) -> str:
        """Why the loop can no longer serve (its thread died or is stuck), or ``""``.

        The worker's heartbeat calls this (``workers.worker.heartbeat.Reporter.watch``) and
        reports FAILED with the reason, so the supervisor replaces the worker instead of
        it answering READY while nothing takes requests. A loop that was stopped, or not
        started yet, has not failed.
        """
        if self._stop.is_set() or self._thread.ident is None:
            return ""
        if not self._thread.is_alive():
            return "Online request loop died"
        idle = time.monotonic() - self._progress
        # One wait for a batch lasts up to its window: not a sign of being stuck.
        if not self._handling and idle > STUCK_AFTER + self._batcher.window:
            return f"Online request loop made no progress for {idle:.0f} s"
        return ""

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
        """Serve until stopped; nothing but a stop ends the loop.

        Frames the loop holds in its in-flight list (taken with the previous batch's
        replies) are served even once a stop was requested: a draining worker finishes
        what it took. A Redis error waits with capped back-off (logged once per outage)
        and retries; the frames of a batch stay in the in-flight list meanwhile, where
        the next reply pipeline that takes a frame finds them (:meth:`_deliver`) and the
        loop serves them (a batch whose replies could not be pushed within
        :data:`REPLY_RETRY_S` is thus run again once Redis is back). Any other error is
        a bug: it is logged with its traceback, the batch it hit is answered 500 (so no
        client waits for it), and the loop goes on after a short pause.
        """
        outage = Outage("online loop", log)
        held: list[bytes] = []
        while held or not self._stop.is_set():
            self._progress = time.monotonic()
            frames: list[bytes] = []
            try:
                size = self._batcher.size
                if held and (self._stop.is_set() or len(held) >= size):
                    frames, held = held[:size], held[size:]  # no new requests: just these
                else:
                    frames, held = self._batcher.next_batch(IDLE_WAKE, held), []
                if frames:
                    # Take the next frame only while holding no other: the reply pipeline
                    # counts the in-flight list to find frames whose take was lost.
                    take_next = not held and not self._stop.is_set()
                    held += self._serve(frames, take_next)
                outage.recovered()
            except redis.RedisError as exc:
                self._stop.wait(outage.failed(exc))
            except Exception:
                log.exception("online loop: unexpected error; answering its batch and going on")
                self._abandon(frames)
                self._stop.wait(ERROR_PAUSE)

    def _abandon(self, frames: list[bytes]) -> None:
        """Answer 500 to those of ``frames`` still in the in-flight list, and drop them."""
        try:
            answered = answer_frames(self._r, self._inflight, frames, 500, LOOP_FAILED)
        except Exception:  # Redis away too: the supervisor answers them if we die
            log.exception("online loop: could not answer an abandoned batch")
            return
        if answered:
            log.error("online loop: answered %d request(s) of a failed batch", answered)

    def serve(self, frames: list[bytes]) -> None:
        """Answer one batch of frames taken from the queue.

        A frame that does not parse is logged, answered 400 when its id can be read
        (on its ``reply_to`` when that names a reply list, else on ``keys.reply(id)``:
        :func:`control.core.envelope.reply_address`), and dropped from the in-flight list.
        A request older than its deadline (:class:`OnlineLoop`) is answered 408.
        """
        self._serve(frames, take_next=False)

    def _serve(self, frames: list[bytes], take_next: bool) -> list[bytes]:
        """:meth:`serve`; with ``take_next`` (only when the loop holds no other frame),
        the last reply pipeline also takes the first frame of the next batch: returns
        the frames this worker now holds unserved."""
        now = self._clock()
        live: list[tuple[bytes, Request]] = []
        pipe = self._r.pipeline(transaction=False)
        for frame in frames:
            try:
                request = Request.parse(frame)
            except FrameError as exc:
                address = reply_address(frame)
                rid = None if address is None else address[0]
                log.error("dropping a malformed request frame (id %r): %s", rid, exc)
                self.malformed += 1
                if address is not None:
                    rid, key = address
                    error = MALFORMED.format(exc)
                    _push_reply(pipe, key, Reply(status=400, error=error, dequeued=now).to(rid))
                pipe.lrem(self._inflight, 1, frame)  # type: ignore[arg-type]  # bytes are fine
                continue
            if 0 < self._deadline(request) < now:
                # Older than the model's clientTimeoutInMills: not run. TorchServe drops it
                # without a word; the waiting client is told instead of left hanging.
                expired = Reply(status=408, error=EXPIRED, dequeued=now).to(request.id)
                _push_reply(pipe, request.reply_key, expired)
                pipe.lrem(self._inflight, 1, frame)  # type: ignore[arg-type]  # bytes are fine
                continue
            live.append((frame, request))
        pipe.execute()  # sends nothing when every frame is live
        # Describe requests are always a batch of one, as in TorchServe, and so are
        # requests whose caller asked for it (kind "stream").
        predicts = [item for item in live if item[1].kind not in SOLO_KINDS]
        groups = [g for g in [predicts, *([i] for i in live if i[1].kind in SOLO_KINDS)] if g]
        held: list[bytes] = []
        for index, group in enumerate(groups):
            held = self._answer(group, now, take_next and index == len(groups) - 1)
        return held

    def _deadline(self, request: Request) -> float:
        """When ``request`` stops being worth running (wall clock; 0: never)."""
        if request.deadline > 0:
            return request.deadline
        if self._client_timeout > 0:
            return request.enqueued + self._client_timeout
        return 0.0

    def _answer(
        self, group: list[tuple[bytes, Request]], dequeued: float, take_next: bool
    ) -> list[bytes]:
        batch = [to_inference_request(request) for _, request in group]
        requests = [request for _, request in group]
        stream = BatchStream(self._r, requests, dequeued, self._runner.progress)
        self._handling = True
        try:
            answers = self._runner.handle(batch, defer=True, stream=stream)
            replies = [to_reply(r, dequeued) for r in answers]
            if len(replies) != len(group):
                raise HandlerFailure(500, "Number of batch response mismatched")
        except HandlerFailure as exc:
            replies = [Reply(status=exc.status, error=exc.message, dequeued=dequeued)] * len(group)
        except Exception:
            # Not the handler's failure (that is a HandlerFailure) but ours, e.g. a reply
            # that cannot be framed: the clients get a 500, the loop goes on.
            log.exception("online loop: a batch failed outside the handler")
            replies = [Reply(status=500, error=LOOP_FAILED, dequeued=dequeued)] * len(group)
        finally:
            self._handling = False
            self._progress = time.monotonic()
        held = self._deliver(group, replies, take_next)
        # After the replies are out: the batch's metrics (batch size, handler metrics).
        self._runner.observe_deferred()
        return held

    def _deliver(
        self, group: list[tuple[bytes, Request]], replies: list[Reply], take_next: bool = False
    ) -> list[bytes]:
        """Push the replies of a batch and take its frames off the in-flight list, riding
        out a Redis outage of up to :data:`REPLY_RETRY_S` seconds; with ``take_next``,
        the same pipeline takes the first frame of the next batch. Returns the frames
        the in-flight list holds once the batch is acknowledged (what the worker took
        and has not served: that frame, or ``[]``).

        A reply must not be dropped: its frame would stay in the in-flight list of a live
        worker (Redis keeps it across a restart), which the waiting API counts as still
        being worked on, so its client would wait until its own timeout. Pushing a reply
        twice (the first attempt applied, its answer lost) is harmless: the listener
        pops one and ignores a reply to a request it no longer waits for. A take whose
        answer was lost (redis-py retries a pipeline after a connection error) is not
        lost either: the pipeline counts the in-flight list, and any frame there but
        unknown is read back and served. Past the limit the error goes up to the loop;
        the waiting APIs have answered 503 by then (``control.core.dispatch`` rides out
        30 s).
        """
        outage = Outage("online loop replies", log)
        give_up = time.monotonic() + REPLY_RETRY_S
        # A stop requested while the batch ran: take nothing more.
        take_next = take_next and not self._stop.is_set()
        while True:
            pipe = self._r.pipeline(transaction=False)
            for (frame, request), reply in zip(group, replies, strict=True):
                # The reply before the LREM: a waiting API never sees the request nowhere.
                _push_reply(pipe, request.reply_key, reply.to(request.id))
                pipe.lrem(self._inflight, 1, frame)  # type: ignore[arg-type]  # bytes are fine
            if take_next:
                self._batcher.prefetch(pipe)
                pipe.llen(self._inflight)
            try:
                results = pipe.execute()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() >= give_up:
                    raise
                # Not the stop event's wait: a stopping worker still owes these replies.
                time.sleep(outage.failed(exc))
                self._progress = time.monotonic()
                continue
            outage.recovered()
            if not take_next:
                return []
            taken = [] if (moved := _frame(results[-2])) is None else [moved]
            if int(results[-1]) == len(taken):
                return taken
            # More in the in-flight list than this pipeline took: an earlier take whose
            # answer was lost. Everything there is this worker's and unserved; oldest
            # (rightmost) first.
            stray = [_frame(f) for f in reversed(self._r.lrange(self._inflight, 0, -1))]
            return [f for f in stray if f is not None]


def _push_reply(pipe: Any, key: str, reply: Reply) -> None:
    pipe.lpush(key, reply.frame())
    pipe.pexpire(key, REPLY_TTL_MS)


def answer_all(client: redis.Redis, inflight: str, status: int, message: str) -> int:
    """Answer every request left in an in-flight list with an error; returns the count.

    Used by the supervisor for a worker that died: TorchServe answers the batch it was
    running with ``Worker died.``; nothing is silently lost or run twice. Each reply goes
    to the frame's reply list (its ``reply_to``, else ``keys.reply(id)``) and names the
    request. A frame that does not parse is answered too when its id is readable, else
    just dropped (logged): no frame makes this raise; only Redis errors do.
    """
    frames = client.lrange(inflight, 0, -1)
    pipe = client.pipeline(transaction=False)
    for frame in frames:
        raw = frame if isinstance(frame, bytes) else str(frame).encode()
        address = reply_address(raw)
        if address is None:
            log.error("dropping an unreadable frame from %s", inflight)
            continue
        rid, key = address
        _push_reply(pipe, key, Reply(status=status, error=message).to(rid))
    pipe.delete(inflight)
    pipe.execute()
    return len(frames)


# KEYS: in-flight list, reply list   ARGV: frame, reply frame, reply TTL (ms).
# Answers only a request still held, in one step, so that a waiting API never finds the
# request nowhere and a request already answered is not answered twice.
_ANSWER_IF_HELD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
"""


def answer_frames(
    client: redis.Redis, inflight: str, frames: list[bytes], status: int, message: str
) -> int:
    """Answer those of ``frames`` still in ``inflight`` with an error, removing them;
    returns how many were answered (on each frame's reply list, naming its request).
    Frames whose id is unreadable are just removed."""
    script = client.register_script(_ANSWER_IF_HELD)
    answered = 0
    for frame in frames:
        address = reply_address(frame)
        if address is None:
            client.lrem(inflight, 1, frame)  # type: ignore[arg-type]  # bytes are fine
            continue
        rid, key = address
        reply = Reply(status=status, error=message).to(rid).frame()
        args: list[Any] = [frame, reply, REPLY_TTL_MS]
        answered += int(script(keys=[inflight, key], args=args))
    return answered
