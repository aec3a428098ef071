"""Celery tasks: thin shells that decode a message, call plain Python, encode the answer.

The model itself is loaded before the worker consumes anything (``workers.process``);
the task only adapts queue messages to :class:`workers.handling` calls.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery

from control.jobs import BATCH_TASK
from workers.handling.types import HandlerFailure
from workers.jobs import run_chunk
from workers.messages import failure_message, parse_request, reply_message
from workers.serving import Handles

PREDICT_TASK = "mqserve.predict"


def predict(model: Handles, message: dict[str, Any]) -> dict[str, Any]:
    """Run one request; a batch-level failure becomes TorchServe's status and message."""
    request = parse_request(message)
    try:
        [reply] = model.handle([request])
    except HandlerFailure as exc:
        return failure_message(exc.status, exc.message)
    return reply_message(reply)


def register_tasks(app: Celery, model: Handles, client: redis.Redis) -> None:
    """Bind the tasks of a model worker to ``model``; batch jobs live in ``client``'s Redis.

    ``model`` is shared by both tasks and the online loop (``workers.serving.ModelRunner``
    serialises them), which is how batch jobs share a worker with online requests.
    """

    @app.task(name=PREDICT_TASK, acks_late=True)  # type: ignore[untyped-decorator]
    def predict_task(message: dict[str, Any]) -> dict[str, Any]:
        return predict(model, message)

    # ignore_result: a chunk's outcome is in the job's Redis keys (control.jobs). A Redis
    # error would leave the chunk's items pending forever: retry, which is safe.
    batch = app.task(
        name=BATCH_TASK,
        acks_late=True,
        ignore_result=True,
        autoretry_for=(redis.RedisError,),
        retry_backoff=True,
        max_retries=8,
    )

    @batch  # type: ignore[untyped-decorator]
    def batch_task(job_id: str, start: int, end: int) -> None:
        run_chunk(client, model, job_id, start, end)
