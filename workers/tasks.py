"""Celery tasks: thin shells that decode a message, call plain Python, encode the answer.

The model itself is loaded before the worker consumes anything (``workers.process``);
the task only adapts queue messages to :class:`workers.handling` calls.
"""

from __future__ import annotations

from typing import Any, Protocol

from celery import Celery

from workers.handling.types import HandlerFailure, InferenceReply, InferenceRequest
from workers.messages import failure_message, parse_request, reply_message

PREDICT_TASK = "mqserve.predict"


class Handles(Protocol):
    """What a task needs from a loaded model (``workers.handling.LoadedModel``)."""

    def handle(self, batch: list[InferenceRequest]) -> list[InferenceReply]: ...


def predict(model: Handles, message: dict[str, Any]) -> dict[str, Any]:
    """Run one request; a batch-level failure becomes TorchServe's status and message."""
    request = parse_request(message)
    try:
        [reply] = model.handle([request])
    except HandlerFailure as exc:
        return failure_message(exc.status, exc.message)
    return reply_message(reply)


def register_tasks(app: Celery, model: Handles) -> None:
    """Bind the tasks of a model worker to ``model``."""

    @app.task(name=PREDICT_TASK, acks_late=True)  # type: ignore[untyped-decorator]
    def predict_task(message: dict[str, Any]) -> dict[str, Any]:
        return predict(model, message)
