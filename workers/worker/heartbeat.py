"""A worker's own record in Redis: its state, and a heartbeat that keeps it alive.

The record expires three heartbeats after the process stops refreshing it, so a dead or
hung worker disappears from describe and the supervisor notices, without any other
liveness protocol. The heartbeat runs in a daemon thread: the GIL switch interval keeps
it on time even during CPU-bound Python, and torch releases the GIL anyway.

A worker that is alive but cannot serve must not say READY: each beat asks the
liveness check given to :meth:`Reporter.watch` (the online loop's), and a serving
worker whose check names a reason is published FAILED with that reason, which makes
the supervisor replace it. The heartbeat outlives Redis outages: a beat that fails is
retried on the next one, and the first beat after Redis returns re-creates the record
(with its TTL) even if it expired meanwhile.

A worker outlives its supervisor (a restarted supervisor adopts it) but not its slot:
each beat also reads the worker's slot lease (:class:`LeaseWatch`). A lease held by
another host means the slot was given to a replacement there (this host was cut off):
the worker publishes DRAINING, never READY, and drains at once. A lease absent for
longer than :data:`control.core.observed.LEASE_GRACE` means no supervisor came back for it:
the worker drains too. While Redis is unreachable nothing is decided.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
import redis

from control.core import observed
from control.core.observed import WorkerRecord, WorkerState
from control.core.redis_io import text
from workers.outage import Outage

log = logging.getLogger(__name__)


@dataclass
class LeaseWatch:
    """Whether a worker may go on serving, from the holder of its slot lease.

    ``key`` is the lease (``keys.slot``) and ``host`` the worker's own host. Stateful
    only in when the lease was first seen absent: a supervisor re-claims a lease that
    expired in an outage, or a restarted one adopts the worker, within the grace.
    """

    key: str
    host: str
    grace: float = observed.LEASE_GRACE
    absent_since: float | None = None

    def judge(self, holder: str | None, now: float) -> str:
        """``""`` to go on serving, or why the worker must drain (``holder`` is the
        lease's value as read now, None when absent)."""
        if holder == self.host:
            self.absent_since = None
            return ""
        if holder is not None:
            return f"its slot was taken over by host {holder}"
        if self.absent_since is None:
            self.absent_since = now
        if now - self.absent_since > self.grace:
            return f"its slot lease has been gone for over {self.grace:g} s (no supervisor)"
        return ""


class Reporter:
    """Publishes one worker's record; thread-safe."""

    def __init__(self, client: redis.Redis, record: WorkerRecord) -> None:
        self._r = client
        self._record = record
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc = psutil.Process(os.getpid())
        self._thread: threading.Thread | None = None
        self._busy = 0
        self._busy_since = 0.0
        self._extra_keys: list[tuple[str, int]] = []
        self._liveness: Callable[[], str] | None = None
        self._lease: LeaseWatch | None = None
        self._on_lost: Callable[[str], None] | None = None
        #: Why the worker gave its slot up ("" while it has it).
        self.lost = ""

    @property
    def record(self) -> WorkerRecord:
        return self._record

    def set_state(self, state: WorkerState, reason: str = "") -> None:
        """Record a state change and publish it now, or, while Redis is away, with the
        next beat that reaches it (never raises for Redis)."""
        now = observed.now()
        memory = self._proc.memory_info().rss
        if self.lost and state.serving:  # a worker that gave its slot up never serves again
            state, reason = WorkerState.DRAINING, self.lost
        with self._lock:
            self._record = dataclasses.replace(
                self._record, state=state, since=now, reason=reason, heartbeat=now, memory=memory
            )
            try:
                self._publish(self._record)
            except redis.RedisError as exc:
                log.warning("worker state %s not published yet (Redis): %r", state.value, exc)

    def watch(self, liveness: Callable[[], str]) -> None:
        """Check ``liveness()`` with every beat while the worker serves: a non-empty
        answer is the reason the worker is published FAILED (and stays so)."""
        self._liveness = liveness

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Mark the worker BUSY while the block runs (nesting allowed).

        Nothing is written per request: the heartbeat publishes BUSY, with the time
        the work began, within half an interval, which is all the supervisor's
        response timeout needs, and keeps Redis off the request path.
        """
        with self._lock:
            if self._busy == 0:
                self._busy_since = observed.now()
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1

    def progress(self) -> None:
        """The busy worker answered part of its batch (a streamed piece went out): the
        time its work began is now, so the supervisor's ``response_timeout`` counts
        from the latest reply, as TorchServe's per-reply timeout does."""
        with self._lock:
            if self._busy:
                self._busy_since = observed.now()

    def guard(self, lease: LeaseWatch, on_lost: Callable[[str], None]) -> None:
        """Read ``lease`` with every beat; the first time it says the worker must drain,
        call ``on_lost(reason)`` (once) and publish DRAINING from then on."""
        self._lease = lease
        self._on_lost = on_lost

    def keep_alive(self, key: str, ttl_ms: int) -> None:
        """Refresh ``key``'s TTL with every beat (the worker's in-flight list)."""
        self._extra_keys.append((key, ttl_ms))

    def start(self) -> None:
        """Start beating in a daemon thread."""
        self._thread = threading.Thread(target=self._beat, name="mqserve-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; the record then expires unless someone else refreshes it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * observed.HEARTBEAT_INTERVAL)

    def _publish(self, record: WorkerRecord) -> None:
        """Publish ``record``; never as serving while another host holds the slot."""
        observed.publish(self._r, record, lease=self._lease.key if self._lease else "")

    def _check_lease(self) -> None:
        """Read the slot lease (Redis errors propagate: nothing is decided then)."""
        if self._lease is None or self.lost or self._record.state is WorkerState.DRAINING:
            return  # a draining worker gave its slot up already (its lease is released)
        holder = self._r.get(self._lease.key)
        reason = self._lease.judge(None if holder is None else text(holder), observed.now())
        if reason:
            log.warning("worker %s drains: %s", self._record.wid, reason)
            self.lost = reason
            with self._lock:
                self._record = dataclasses.replace(
                    self._record, state=WorkerState.DRAINING, since=observed.now(), reason=reason
                )
            if self._on_lost is not None:
                self._on_lost(reason)

    def _beat_record(self, memory: int) -> WorkerRecord:
        """The record to publish now; READY and BUSY follow :meth:`busy`, FAILED the
        liveness check; a worker that lost its slot stays DRAINING."""
        record = dataclasses.replace(self._record, memory=memory, heartbeat=observed.now())
        if self.lost:
            return dataclasses.replace(record, state=WorkerState.DRAINING, reason=self.lost)
        reason = self._liveness() if record.state.serving and self._liveness else ""
        if reason:
            log.error("worker %s can no longer serve: %s", record.wid, reason)
            return dataclasses.replace(
                record, state=WorkerState.FAILED, since=observed.now(), reason=reason
            )
        if record.state.serving:
            # ``since`` follows the current batch's start (or its latest streamed piece,
            # :meth:`progress`) even when the previous beat already said BUSY.
            busy_since = self._busy_since
            if self._busy and (record.state is not WorkerState.BUSY or record.since != busy_since):
                record = dataclasses.replace(record, state=WorkerState.BUSY, since=busy_since)
            elif not self._busy and record.state is WorkerState.BUSY:
                record = dataclasses.replace(record, state=WorkerState.READY, since=observed.now())
        return record

    def _beat(self) -> None:
        outage = Outage("heartbeat", log)
        while not self._stop.wait(observed.HEARTBEAT_INTERVAL / 2):
            try:
                self._check_lease()
                memory = self._proc.memory_info().rss
                with self._lock:
                    self._record = self._beat_record(memory)
                    self._publish(self._record)
                for key, ttl in self._extra_keys:
                    self._r.pexpire(key, ttl)
                outage.recovered()
            except redis.RedisError as exc:
                outage.failed(exc)  # Redis away: the next beat retries, on time
            except Exception:
                # A bug must not silence the heartbeat (the supervisor would kill a
                # healthy worker for it): log it and beat again.
                log.exception("heartbeat failed")
