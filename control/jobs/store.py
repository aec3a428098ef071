"""Batch jobs: many inputs for one model version, run by that version's workers.

A job is submitted once and then lives in Redis only (``control.core.keys``), so any API
process can report on it, before and after restarts:

* ``mqs:job:{id}`` (HASH): ``model``, ``version``, ``status``, ``total``, ``done``,
  ``failed``, ``created`` and ``expires`` (epoch seconds), and what workers need to
  run the items: ``content_type`` (of every item) and ``batch_size`` (the model
  version's, at submission); ``requeued:{start}`` counts the requeues of one chunk.
* ``mqs:job:{id}:items`` (HASH): item index -> input bytes; deleted once the job is
  finished or cancelled, since nothing reads inputs after that.
* ``mqs:job:{id}:results`` (HASH): item index -> ``{"status", "result"|"error"}``
  JSON, written by workers (``workers.worker.batch``).

Every key expires ``ttl_s`` after submission, finished or not.

Statuses: ``queued`` (nothing ran yet) -> ``running`` -> ``succeeded`` (every item
has a result and at least one succeeded) or ``failed`` (every item failed), or
``cancelled`` from ``queued``/``running``. Items are sent to the version's Celery
queue in chunks (:func:`chunk_size`); a worker runs a chunk as batches of
``batch_size`` through the same model object that serves online requests. A chunk
whose worker dies is sent again (:func:`send_chunk`) by the supervisor that reaps the
worker (``workers.worker.batch.requeue_held``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis

from control.core import keys
from control.core.errors import (
    BadRequestException,
    JobNotFoundException,
    ServiceUnavailableException,
)
from control.core.redis_io import text
from control.core.registry import Registry
from control.core.timestamps import iso_time

#: The Celery task that runs one chunk of a job (``workers.worker.tasks``).
BATCH_TASK = "mqserve.batch"

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
#: Statuses after which no item runs any more.
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED})

#: Items per queue message when the model takes one request at a time: one message per
#: item would cost a Celery round trip each, a bigger chunk would hold a worker longer
#: between checks for cancellation.
UNBATCHED_CHUNK = 16
#: Fields per HSET command when writing items (keeps each command a modest size).
_HSET_FIELDS = 1000
DEFAULT_TTL_S = 86400

# KEYS: job, items   ARGV: (none). Cancels a job still queued or running.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled')
  redis.call('DEL', KEYS[2])
  return 'cancelled'
end
return status
"""


class TaskSender(Protocol):
    """What the store needs from a Celery app: ``Celery.send_task``."""

    def send_task(self, name: str, args: Any = None, **options: Any) -> Any: ...


def chunk_size(batch_size: int) -> int:
    """Items per queue message: one batch, or :data:`UNBATCHED_CHUNK` for batch size 1."""
    return batch_size if batch_size > 1 else UNBATCHED_CHUNK


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` index ranges (end exclusive) covering ``range(total)``."""
    for start in range(0, total, max(size, 1)):
        yield start, min(start + size, total)


def send_chunk(celery_app: TaskSender, job_id: str, queue: str, start: int, end: int) -> None:
    """Queue the message that runs items ``start`` .. ``end - 1`` of ``job_id`` on
    ``queue`` (the model version's ``keys.batch_queue``). The one encoder of chunk
    messages: submission and the supervisor's requeue (``workers.worker.batch``) both use it."""
    # ignore_result: progress travels through the job hash; a result would also make
    # Celery subscribe the sender to a channel per chunk.
    celery_app.send_task(BATCH_TASK, args=[job_id, start, end], queue=queue, ignore_result=True)


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job's progress."""

    job_id: str
    model: str
    version: str
    status: str
    total: int
    done: int
    failed: int
    created: float
    expires: float

    @property
    def finished(self) -> bool:
        """True once no further item will run (succeeded, failed or cancelled)."""
        return self.status in FINISHED

    def to_json(self) -> dict[str, Any]:
        """The REST representation (camelCase keys, ISO times)."""
        return {
            "jobId": self.job_id,
            "model": self.model,
            "version": self.version,
            "status": self.status,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "created": iso_time(self.created),
            "expires": iso_time(self.expires),
        }

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[Any, Any]) -> JobStatus:
        """Parse the job hash as read from Redis (``str`` or ``bytes`` values)."""
        data = {text(k): text(v) for k, v in raw.items()}
        return cls(
            job_id=job_id,
            model=data["model"],
            version=data["version"],
            status=data["status"],
            total=int(data["total"]),
            done=int(data.get("done", "0")),
            failed=int(data.get("failed", "0")),
            created=float(data["created"]),
            expires=float(data["expires"]),
        )


class JobStore:
    """Submits, reports on and cancels batch jobs. Thread-safe; holds no job state.

    Unknown, malformed and expired job ids all raise ``JobNotFoundException``.
    """

    def __init__(
        self,
        client: redis.Redis,
        celery_app: TaskSender,
        clock: Callable[[], float] = time.time,
        ttl_s: int = DEFAULT_TTL_S,
    ) -> None:
        self._r = client
        self._celery = celery_app
        self._clock = clock
        self._ttl_s = ttl_s
        self._registry = Registry(client, clock)
        self._cancel = client.register_script(_CANCEL)

    def submit(
        self,
        model: str,
        version: str | None,
        items: Sequence[bytes],
        content_type: str = "application/json",
    ) -> JobStatus:
        """Store a job of ``items`` (UTF-8 bytes each) and queue its chunks.

        Raises TorchServe's 404s for an unknown model or version, and
        ``BadRequestException`` for no items or an item that is not UTF-8. The job and
        its items are written in one transaction before any chunk is queued, so a
        worker never sees a chunk of a job it cannot read. If queueing fails part way,
        the job is cancelled and ``ServiceUnavailableException`` (503) raised.
        """
        if not items:
            raise BadRequestException("A batch job needs at least one input")
        _check_utf8(items)
        spec = self._registry.get(model, version).spec
        job_id = uuid.uuid4().hex
        created = self._clock()
        status = JobStatus(
            job_id, model, spec.version, QUEUED, len(items), 0, 0, created, created + self._ttl_s
        )
        self._write(status, items, content_type, spec.batch_size)
        try:
            queue = keys.batch_queue(model, spec.version)
            self._enqueue(job_id, queue, len(items), spec.batch_size)
        except Exception as exc:  # kombu and redis-py raise their own error types
            # A job missing some chunks would never finish: cancel it, report the outage.
            self._cancel(keys=[keys.job(job_id), keys.job_items(job_id)])
            raise ServiceUnavailableException(f"Cannot queue the batch job: {exc}") from exc
        return status

    def _enqueue(self, job_id: str, queue: str, total: int, batch_size: int) -> None:
        for start, end in chunks(total, chunk_size(batch_size)):
            send_chunk(self._celery, job_id, queue, start, end)

    def _write(
        self, status: JobStatus, items: Sequence[bytes], content_type: str, batch_size: int
    ) -> None:
        job_key, items_key = keys.job(status.job_id), keys.job_items(status.job_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(
            job_key,
            mapping={
                "model": status.model,
                "version": status.version,
                "status": status.status,
                "total": status.total,
                "done": 0,
                "failed": 0,
                "created": repr(status.created),
                "expires": repr(status.expires),
                "content_type": content_type,
                "batch_size": max(batch_size, 1),
            },
        )
        for start, end in chunks(len(items), _HSET_FIELDS):
            pipe.hset(items_key, mapping={str(i): items[i] for i in range(start, end)})
        for key in (job_key, items_key):
            pipe.expire(key, self._ttl_s)
        pipe.execute()

    def status(self, job_id: str) -> JobStatus:
        """The job's current status and counts."""
        raw = self._r.hgetall(keys.job(job_id)) if _plausible(job_id) else {}
        if not raw:
            raise _not_found(job_id)
        return JobStatus.from_hash(job_id, raw)

    def results(self, job_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        """Results of items ``offset`` .. ``offset + limit - 1`` (clipped), in input order.

        Each is ``{"index", "status": 200, "result"}`` (the reply body as its JSON value
        when it parses as JSON, else as text; ``resultBase64`` instead of ``result`` when
        the body is not UTF-8), ``{"index", "status": <code>, "error"}`` for a failed
        item, or ``{"index", "status": None}`` for an item that has not run (yet, or
        ever, if the job was cancelled).
        """
        return self.results_page(job_id, offset, limit)[0]

    def results_page(
        self, job_id: str, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        """:meth:`results` and the offset of the next page (None after the last item)."""
        total = self.status(job_id).total
        start = max(offset, 0)
        indices = range(start, min(start + max(limit, 0), total))
        if not indices:
            return [], None
        raw = self._r.hmget(keys.job_results(job_id), [str(i) for i in indices])
        out: list[dict[str, Any]] = []
        for index, value in zip(indices, raw, strict=True):
            entry: dict[str, Any] = {"index": index}
            entry.update(orjson.loads(value) if value is not None else {"status": None})
            out.append(entry)
        return out, (indices.stop if indices.stop < total else None)

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a queued or running job; returns the status after the attempt.

        Items already running finish (their results are kept); chunks not yet run are
        skipped by the workers. A finished job is left as it is: the returned status
        says which. Unknown job: ``JobNotFoundException``.
        """
        if not _plausible(job_id):
            raise _not_found(job_id)
        if self._cancel(keys=[keys.job(job_id), keys.job_items(job_id)]) is None:
            raise _not_found(job_id)
        return self.status(job_id)


def _not_found(job_id: str) -> JobNotFoundException:
    # Never echo an arbitrary client string at length.
    return JobNotFoundException(f"Job not found: {job_id[:64]}")


def _plausible(job_id: str) -> bool:
    """Ids are ``uuid4().hex``; anything else cannot name a job (and never reaches Redis)."""
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def _check_utf8(items: Sequence[bytes]) -> None:
    # Workers read items through decode_responses clients, and every producer (REST,
    # BatchClient, CLI) sends JSON text, so only UTF-8 is accepted.
    for index, item in enumerate(items):
        try:
            item.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestException(f"Input {index} is not UTF-8 text") from None
