"""Synchronous calls: wait, by polling Redis, until workers report the wanted state.

TorchServe's synchronous register and scale return when every new worker has loaded
(200) or when the first one fails (500, or 507 for out-of-memory). Here workers report
their state to Redis (:mod:`control.core.observed`), so the wait is a poll of those records
with a deadline; it needs nothing from the supervisor beyond the records themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from control.core.observed import WorkerRecord, WorkerState, serving_count, workers_of

#: Poll period: short, because a synchronous register's latency includes it.
POLL_INTERVAL = 0.02

_OOM_MARKERS = ("MemoryError", "out of memory", "CUDA")


@dataclass(frozen=True)
class WaitResult:
    """Result of a wait: ``ok``, or the failure with its HTTP status (500/507)."""

    ok: bool
    status: int = 200
    reason: str = ""


def failure_status(reason: str) -> int:
    """507 for out-of-memory failures, as TorchServe maps them; 500 otherwise."""
    return 507 if any(marker in reason for marker in _OOM_MARKERS) else 500


class WorkerWaiter:
    """Polls worker records of one model version until a condition or a deadline."""

    def __init__(
        self,
        client: redis.Redis,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self._r = client
        self._clock = clock
        self._sleep = sleep
        self._interval = interval

    def until_ready(
        self, name: str, version: str, count: int, since: float, timeout: float
    ) -> WaitResult:
        """Wait until ``count`` workers serve, or a worker started at/after ``since``
        (wall-clock seconds) reports FAILED, or ``timeout`` seconds pass."""
        deadline = self._clock() + timeout
        while True:
            records = workers_of(self._r, name, version)
            failed = _first_failure(records, since)
            if failed is not None:
                return WaitResult(False, failure_status(failed.reason), failed.reason)
            if serving_count(records) >= count:
                return WaitResult(True)
            if self._clock() >= deadline:
                return WaitResult(False, 500, "timed out waiting for workers to load")
            self._sleep(self._interval)

    def until_at_most(self, name: str, version: str, count: int, timeout: float) -> bool:
        """Wait until at most ``count`` workers still take requests; False on timeout.

        Workers are counted by the one rule (:data:`control.core.observed.SERVING`): a DRAINING
        worker takes nothing new (it finishes the request it runs and exits), so it no
        longer counts, and scale-down and unregister answer once capacity is gone.
        """
        deadline = self._clock() + timeout
        while serving_count(workers_of(self._r, name, version)) > count:
            if self._clock() >= deadline:
                return False
            self._sleep(self._interval)
        return True


def _first_failure(records: list[WorkerRecord], since: float) -> WorkerRecord | None:
    for record in records:
        if record.state is WorkerState.FAILED and record.started_at >= since:
            return record
    return None
