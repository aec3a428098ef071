"""The Celery application: configuration for model queues, built from :class:`Settings`.

Choices (the measured reasons are in ``docs/design-notes.md#acknowledgement-and-redelivery``
and ``docs/design-notes.md#liveness``):

* JSON only, in both directions; a pickled message is refused, never loaded.
* ``acks_late`` + ``reject_on_worker_lost`` + prefetch 1: a request is acknowledged
  after it ran, and a worker never holds requests it is not running.
* ``unacked_restore_throttle=1``: a SIGKILLed worker's request comes back after the
  visibility timeout, not after kombu 5.7's ~100 s sweep cadence on top of it.
* No task events, and workers run ``--without-gossip --without-mingle
  --without-heartbeat``: liveness comes from our own heartbeat records.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from control.core.redis_io import CONNECT_TIMEOUT, HEALTH_CHECK_INTERVAL, SOCKET_TIMEOUT
from control.core.settings import Settings

#: Seconds before kombu re-delivers a message whose worker vanished. It must exceed the
#: longest request; requests carry their own deadline (``expires``) so a late
#: redelivery of a request nobody waits for is dropped, not run.
VISIBILITY_TIMEOUT = 900


def broker_url(redis_url: str) -> str:
    """kombu's spelling of a redis-py URL (``unix://`` becomes ``redis+socket://``)."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings.redis_url``; connects lazily."""
    if settings.redis_url is None:
        raise ValueError("settings.redis_url must be set")
    url = broker_url(settings.redis_url)
    transport: dict[str, Any] = {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_throttle": 1,
        "unacked_restore_interval": 5,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        # kombu's default is none: a Redis gone without closing TCP would hang a worker's
        # BRPOP (which blocks for polling_interval only) or a task's result write forever.
        "socket_timeout": SOCKET_TIMEOUT,
        # The BRPOP timeout (kombu reads it from polling_interval). A warm shutdown waits
        # for the pending BRPOP, so this bounds how long an idle worker takes to drain.
        "polling_interval": 0.25,
    }
    app = Celery("mqserve", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_create_missing_queues=True,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        visibility_timeout=VISIBILITY_TIMEOUT,
        result_expires=3600,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
