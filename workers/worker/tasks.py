"""Celery tasks: thin shells that decode a message, call plain Python, encode the answer.

The model itself is loaded before the worker consumes anything (``workers.worker.process``);
the task only adapts queue messages to :class:`workers.handling` calls.

Anyone who can write to a model's Celery queue can send these tasks, so their arguments
are checked: a message that does not validate is logged and answered with
:func:`workers.worker.messages.failure_message` (400), never raised out of the task. What is
not even a Celery message is dropped by the broker transport (``workers.worker.broker``).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from control.jobs.store import BATCH_TASK
from workers.handling.types import HandlerFailure
from workers.worker.batch import held_ttl, holding, run_chunk
from workers.worker.messages import MessageError, failure_message, parse_request, reply_message
from workers.worker.serving import Handles

log = logging.getLogger(__name__)

PREDICT_TASK = "mqserve.predict"
#: The most items one batch-job message may name (real chunks are one batch, or 16).
MAX_CHUNK_ITEMS = 65_536
#: The answer to a batch-job message that does not validate (nobody reads it: the
#: task ignores results; it is for the log and the tests).
BAD_CHUNK = "Invalid batch job message"
#: ``response_timeout`` when the caller names none (``control.core.spec.ModelSpec``'s default).
DEFAULT_RESPONSE_TIMEOUT = 120.0


def predict(model: Handles, message: Any) -> dict[str, Any]:
    """Run one request; a batch-level failure becomes TorchServe's status and message,
    a message that is not a request 400, and anything else raised 500 (logged)."""
    try:
        request = parse_request(message)
    except MessageError as exc:
        log.error("invalid %s message answered 400: %s", PREDICT_TASK, exc)
        return failure_message(400, f"Invalid request message: {exc}")
    try:
        [reply] = model.handle([request])
    except HandlerFailure as exc:
        return failure_message(exc.status, exc.message)
    except Exception:
        log.exception("%s failed outside the handler", PREDICT_TASK)
        return failure_message(500, "Internal Server Error")
    return reply_message(reply)


def chunk_problem(job_id: Any, start: Any, end: Any) -> str:
    """Why ``(job_id, start, end)`` cannot name a chunk of a batch job, or ``""``."""
    if not isinstance(job_id, str) or not job_id or len(job_id) > 64:
        return "job id is not a short string"
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in (start, end)):
        return "start and end are not integers"
    if not 0 <= start <= end or end - start > MAX_CHUNK_ITEMS:
        return f"item range [{start}, {end}) is out of bounds"
    return ""


def register_tasks(
    app: Celery,
    model: Handles,
    client: redis.Redis,
    wid: str,
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT,
) -> None:
    """Bind the tasks of model worker ``wid`` to ``model``; batch jobs live in
    ``client``'s Redis.

    ``model`` is shared by both tasks and the online loop (``workers.worker.serving.ModelRunner``
    serialises them), which is how batch jobs share a worker with online requests. While
    a batch-job chunk runs, the worker's held marker names it (``workers.worker.batch.holding``,
    living :func:`workers.worker.batch.held_ttl` of ``response_timeout``), so that its supervisor
    requeues the chunk at once if the worker dies.
    """

    # typing=False and *args: a call with the wrong arguments is answered 400 by us,
    # not failed by Celery's signature check. shared=False: these tasks belong to this
    # app only (Celery's default also adds them to every app created later).
    @app.task(name=PREDICT_TASK, acks_late=True, typing=False, shared=False)  # type: ignore[untyped-decorator]
    def predict_task(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if len(args) + len(kwargs) != 1 or (kwargs and "message" not in kwargs):
            log.error("%s called with %d argument(s) answered 400", PREDICT_TASK, len(args))
            return failure_message(400, "Invalid request message: expected one message")
        return predict(model, args[0] if args else kwargs["message"])

    # ignore_result: a chunk's outcome is in the job's Redis keys (control.jobs.store). A Redis
    # error would leave the chunk's items pending forever: retry, which is safe.
    batch = app.task(
        name=BATCH_TASK,
        shared=False,
        acks_late=True,
        ignore_result=True,
        autoretry_for=(redis.RedisError,),
        retry_backoff=True,
        max_retries=8,
    )

    @batch  # type: ignore[untyped-decorator]
    def batch_task(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
        if kwargs or len(args) != 3:
            problem = "expected the arguments (job id, start, end)"
        else:
            problem = chunk_problem(*args)
        if problem:
            log.error("invalid %s message dropped: %s", BATCH_TASK, problem)
            return failure_message(400, f"{BAD_CHUNK}: {problem}")
        job_id, start, end = args
        # Cleared however the chunk ends, a raise included: only a dead worker leaves one.
        with holding(client, wid, job_id, start, end, held_ttl(response_timeout, end - start)):
            run_chunk(client, model, job_id, start, end)
        return None
