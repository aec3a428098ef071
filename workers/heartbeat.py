"""A worker's own record in Redis: its state, and a heartbeat that keeps it alive.

The record expires three heartbeats after the process stops refreshing it, so a dead or
hung worker disappears from describe and the supervisor notices, without any other
liveness protocol. The heartbeat runs in a daemon thread: the GIL switch interval keeps
it on time even during CPU-bound Python, and torch releases the GIL anyway.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import psutil
import redis

from control import observed
from control.observed import WorkerRecord, WorkerState


class Reporter:
    """Publishes one worker's record; thread-safe."""

    def __init__(self, client: redis.Redis, record: WorkerRecord) -> None:
        self._r = client
        self._record = record
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc = psutil.Process(os.getpid())
        self._thread: threading.Thread | None = None

    @property
    def record(self) -> WorkerRecord:
        return self._record

    def set_state(self, state: WorkerState, reason: str = "") -> None:
        """Record a state change now (not at the next beat)."""
        now = observed.now()
        memory = self._proc.memory_info().rss
        with self._lock:
            self._record = dataclasses.replace(
                self._record, state=state, since=now, reason=reason, heartbeat=now, memory=memory
            )
            observed.publish(self._r, self._record)

    def start(self) -> None:
        """Start beating in a daemon thread."""
        self._thread = threading.Thread(target=self._beat, name="mqserve-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; the record then expires unless someone else refreshes it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * observed.HEARTBEAT_INTERVAL)

    def _beat(self) -> None:
        while not self._stop.wait(observed.HEARTBEAT_INTERVAL / 2):
            try:
                memory = self._proc.memory_info().rss
                with self._lock:
                    self._record = dataclasses.replace(
                        self._record, memory=memory, heartbeat=observed.now()
                    )
                    observed.publish(self._r, self._record)
            except redis.RedisError:
                continue  # Redis away for a moment: the next beat retries
