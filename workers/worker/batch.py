"""Running one chunk of a batch job (``control.jobs.store``) inside a model worker.

A chunk is the item range ``[start, end)`` of one job. The worker reads the items,
runs them through the model in batches of the job's ``batch_size`` and records each
result with its count in one Lua script, so that:

* a chunk delivered twice (Celery redelivers the message of a worker that died, and
  a message may even reach two workers) never counts an item twice: a result is
  written with HSETNX and counted only when it was new;
* items that already have a result are not run again;
* a job that was cancelled, finished or expired is skipped, and a cancellation seen
  after a batch stops the rest of the chunk.

Worker death: while a worker runs a chunk, its held marker (``keys.held``) names the
chunk (:func:`holding`). The supervisor that finds the worker dead calls
:func:`requeue_held`, which sends the chunk again at once (at most
:data:`MAX_REQUEUES` times; after that its pending items fail ``Worker died.``) instead
of leaving it to the broker's visibility timeout.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeGuard

import orjson
import redis

from control.core import keys
from control.core.redis_io import text
from control.core.settings import Settings
from control.jobs.store import FINISHED, QUEUED, RUNNING, TaskSender, send_chunk
from workers.handling.types import HandlerFailure, InferenceReply, InferenceRequest, Parameter
from workers.worker.serving import Handles

log = logging.getLogger(__name__)

# KEYS: job   ARGV: (none). Returns {status, content_type, batch_size}; queued -> running.
_BEGIN = """
local fields = redis.call('HMGET', KEYS[1], 'status', 'content_type', 'batch_size')
if not fields[1] then return false end
if fields[1] == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running')
  fields[1] = 'running'
end
return fields
"""

# KEYS: job, items, results   ARGV: index, result JSON, ok ('1'/'0'), repeated.
# Returns the job's status after recording (false when the job has expired).
_RECORD = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
local ok, bad = 0, 0
for i = 1, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    if ARGV[i + 2] == '1' then ok = ok + 1 else bad = bad + 1 end
  end
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
local done = redis.call('HINCRBY', KEYS[1], 'done', ok)
local failed = redis.call('HINCRBY', KEYS[1], 'failed', bad)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if done + failed >= total and (status == 'queued' or status == 'running') then
  if done > 0 then status = 'succeeded' else status = 'failed' end
  redis.call('HSET', KEYS[1], 'status', status)
  redis.call('DEL', KEYS[2])
end
return status
"""

#: The error recorded for an item whose batch raised something other than a
#: HandlerFailure (a bug outside the handler): the job must still finish.
INTERNAL_ERROR = (500, "Internal Server Error")

# KEYS: job   ARGV: the chunk's attempt field. Counts one requeue of a chunk of a job
# still queued or running; returns {attempts, model, version}, or false (job finished,
# cancelled or expired: nothing is written, so no hash is created without a TTL).
_COUNT_REQUEUE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return false end
local attempts = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local model = redis.call('HGET', KEYS[1], 'model') or ''
local version = redis.call('HGET', KEYS[1], 'version') or ''
return {attempts, model, version}
"""

#: Times one chunk is sent again after the worker running it died. A poison item that
#: kills every worker running it stops there: its chunk's pending items then fail.
MAX_REQUEUES = 2
#: What an item whose chunk outlived :data:`MAX_REQUEUES` workers records (TorchServe's
#: answer to a request whose worker died).
WORKER_DIED = (500, "Worker died.")
#: The shortest life of a held marker, in seconds (see :func:`held_ttl`).
MIN_HELD_TTL_S = 600

#: ``send(job_id, queue, start, end)``: queues one chunk message (:func:`chunk_sender`).
ChunkSender = Callable[[str, str, int, int], None]


def run_chunk(client: redis.Redis, model: Handles, job_id: str, start: int, end: int) -> int:
    """Run items ``start`` .. ``end - 1`` of ``job_id``; returns how many went to the model.

    Never raises for a failing model: a batch the model fails as a whole gives each of
    its items that status and message. Redis errors propagate; running the chunk again
    is always safe (items with a result are neither re-run nor re-counted).
    """
    begun = client.register_script(_BEGIN)(keys=[keys.job(job_id)])
    if not begun or text(begun[0]) not in (QUEUED, RUNNING):
        return 0
    content_type, batch_size = text(begun[1] or ""), max(int(begun[2] or 1), 1)
    pending = _pending(client, job_id, range(start, end))
    record = client.register_script(_RECORD)
    job_keys = [keys.job(job_id), keys.job_items(job_id), keys.job_results(job_id)]
    ran = 0
    for offset in range(0, len(pending), batch_size):
        batch = pending[offset : offset + batch_size]
        args: list[Any] = []
        for index, result, ok in _run_batch(model, job_id, content_type, batch):
            args.extend((index, result, "1" if ok else "0"))
        ran += len(batch)
        status = record(keys=job_keys, args=args)
        if status is None or text(status) in FINISHED:
            break
    return ran


def held_ttl(response_timeout: float, items: int) -> int:
    """Seconds a held marker lives: longer than the slowest chunk of ``items`` items (at
    most one batch per item, each within ``response_timeout`` or the supervisor kills the
    worker), and at least :data:`MIN_HELD_TTL_S`. It only bounds how long the marker of
    a worker whose whole host vanished (no supervisor to reap it) stays in Redis."""
    return int(max(response_timeout * items, MIN_HELD_TTL_S))


@contextlib.contextmanager
def holding(
    client: redis.Redis, wid: str, job_id: str, start: int, end: int, ttl_s: int
) -> Iterator[None]:
    """Mark worker ``wid`` as running items ``start`` .. ``end - 1`` of ``job_id`` for the
    duration of the block, however it ends.

    Setting the marker raises Redis errors (the chunk then does not run: the task
    retries). A failed delete is only logged: the marker expires after ``ttl_s``, and a
    requeue of a chunk that finished changes nothing (:func:`requeue_held`).
    """
    marker = orjson.dumps({"job": job_id, "start": start, "end": end})
    client.set(keys.held(wid), marker, ex=max(int(ttl_s), 1))
    try:
        yield
    finally:
        try:
            client.delete(keys.held(wid))
        except redis.RedisError as exc:
            log.warning("worker %s: cannot clear its held batch chunk: %s", wid, exc)


def requeue_held(client: redis.Redis, wid: str, send: ChunkSender) -> int:
    """Requeue the batch-job chunk dead worker ``wid`` held; returns the items sent again.

    For the supervisor, once it has reaped a worker that died (a worker that drained
    finished its chunk and left no marker, so calling this for it too does nothing).
    Reads the worker's held marker and, when the job is still queued or running and the
    chunk has items without a result:

    * counts the attempt in the job hash (``requeued:{start}``) and, for the first
      :data:`MAX_REQUEUES` attempts, sends a fresh chunk message (same job, start and end)
      to the version's batch queue through ``send`` (:func:`chunk_sender`, which uses
      ``control.jobs.store.send_chunk``, the code path of submission);
    * past that, records each pending item of the chunk as failed, TorchServe's 500
      ``Worker died.``, through the same script as :func:`run_chunk`, so counts stay
      exact and the job finishes.

    The marker is deleted in every case. The dead worker's own message is still unacked
    and the broker redelivers it after its visibility timeout (``control.core.celery_app``):
    by then every item of the chunk has a result, so that run is a no-op. A ``send``
    that fails is logged (the attempt stays counted) and that redelivery is then what
    runs the chunk. Redis errors propagate.
    """
    raw = client.get(keys.held(wid))
    if raw is None:
        return 0
    try:
        chunk = _parse_held(raw)
    except ValueError as exc:
        log.error("worker %s held an unreadable batch chunk marker (%s): dropped", wid, exc)
        client.delete(keys.held(wid))
        return 0
    job_id, start, end = chunk
    pending = _pending(client, job_id, range(start, end))
    counted = (
        client.register_script(_COUNT_REQUEUE)(keys=[keys.job(job_id)], args=[f"requeued:{start}"])
        if pending
        else None
    )
    sent = 0
    if counted:
        attempts, model, version = int(counted[0]), text(counted[1]), text(counted[2])
        if attempts <= MAX_REQUEUES:
            sent = _send(send, job_id, keys.batch_queue(model, version), start, end, len(pending))
        else:
            _fail_items(client, job_id, [i for i, _ in pending])
            log.warning(
                "batch job %s: items %d..%d failed, %d workers died running them",
                job_id,
                start,
                end - 1,
                attempts,
            )
    client.delete(keys.held(wid))
    return sent


def _send(send: ChunkSender, job_id: str, queue: str, start: int, end: int, pending: int) -> int:
    try:
        send(job_id, queue, start, end)
    except Exception as exc:  # kombu raises its own error types for a broker outage
        log.warning(
            "batch job %s: cannot requeue items %d..%d (%s); the broker redelivers them "
            "after its visibility timeout",
            job_id,
            start,
            end - 1,
            exc,
        )
        return 0
    return pending


def _fail_items(client: redis.Redis, job_id: str, indices: Sequence[int]) -> None:
    result = _error(*WORKER_DIED)
    args: list[Any] = []
    for index in indices:
        args.extend((index, result, "0"))
    record = client.register_script(_RECORD)
    record(keys=[keys.job(job_id), keys.job_items(job_id), keys.job_results(job_id)], args=args)


def _parse_held(raw: str | bytes) -> tuple[str, int, int]:
    """``(job, start, end)`` of a held marker; ValueError when it is not one."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not an object")
    job_id, start, end = data.get("job"), data.get("start"), data.get("end")
    if not isinstance(job_id, str) or not job_id:
        raise ValueError("no job id")
    if not (_is_index(start) and _is_index(end)):
        raise ValueError("start and end are not integers")
    if not 0 <= start <= end:
        raise ValueError(f"bad item range [{start}, {end})")
    return job_id, start, end


def _is_index(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


_apps: dict[str, TaskSender] = {}
_apps_lock = threading.Lock()


def chunk_sender(settings: Settings) -> ChunkSender:
    """A :data:`ChunkSender` for the stack whose Redis is ``settings.redis_url``.

    Its Celery app is built on the first send and kept for the process's life, one per
    Redis URL: a supervisor builds it once, when a worker first dies holding a chunk,
    never on its ticks.
    """

    def send(job_id: str, queue: str, start: int, end: int) -> None:
        send_chunk(_celery_app(settings), job_id, queue, start, end)

    return send


def _celery_app(settings: Settings) -> TaskSender:
    url = settings.redis_url or ""
    with _apps_lock:
        app = _apps.get(url)
        if app is None:
            from control.core.celery_app import make_celery  # Celery loads only when needed

            app = _apps[url] = make_celery(settings)
        return app


def _pending(client: redis.Redis, job_id: str, indices: range) -> list[tuple[int, bytes]]:
    """``(index, input)`` of the items in ``indices`` that exist and have no result."""
    fields = [str(i) for i in indices]
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.job_items(job_id), fields)
    pipe.hmget(keys.job_results(job_id), fields)
    items, results = pipe.execute()
    return [
        (index, item.encode() if isinstance(item, str) else item)
        for index, item, result in zip(indices, items, results, strict=True)
        if item is not None and result is None
    ]


def _run_batch(
    model: Handles, job_id: str, content_type: str, batch: Sequence[tuple[int, bytes]]
) -> list[tuple[int, bytes, bool]]:
    """``(index, result JSON, succeeded)`` for each item of one batch."""
    requests = [
        InferenceRequest(f"{job_id}:{i}", {}, [Parameter("body", content_type, item)])
        for i, item in batch
    ]
    try:
        replies = model.handle(requests)
    except HandlerFailure as exc:
        return [(i, _error(exc.status, exc.message), False) for i, _ in batch]
    except Exception:  # not the handler's failure: record it rather than stall the job
        log.exception("batch job %s: items %d.. failed", job_id, batch[0][0])
        return [(i, _error(*INTERNAL_ERROR), False) for i, _ in batch]
    return [(i, *_result(reply)) for (i, _), reply in zip(batch, replies, strict=True)]


def _result(reply: InferenceReply) -> tuple[bytes, bool]:
    """The stored JSON for one reply; a status of 400 or more counts as a failed item.

    A successful body is kept as ``result``: its JSON value when it parses as JSON, else
    its text, or as ``resultBase64`` when it is not UTF-8 (an image, a tensor).
    """
    if reply.status >= 400:
        message = reply.body.decode("utf-8", errors="replace")
        return _error(reply.status, message or reply.reason), False
    entry: dict[str, Any] = {"status": reply.status}
    try:
        entry["result"] = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        try:
            entry["result"] = reply.body.decode("utf-8")
        except UnicodeDecodeError:
            entry["resultBase64"] = base64.b64encode(reply.body).decode("ascii")
    return orjson.dumps(entry), True


def _error(status: int, message: str) -> bytes:
    return orjson.dumps({"status": status, "error": message})
