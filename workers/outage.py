"""Riding out Redis outages in long-lived loops: capped back-off, one log line per outage.

Every loop that must outlive Redis (the supervisor's tick, a worker's online loop, its
heartbeat, the supervisor's start-up) catches ``redis.RedisError``, asks an
:class:`Outage` how long to wait, and tries again: Redis restarting, loading its
append-only file (``BusyLoadingError``) or failing over is a pause, never an exit. The
first failure of an outage is logged as an error and the recovery as info; failures in
between go to debug, so a 30 s outage is two log lines, not one per tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff

#: The first wait after a failure and the longest one (seconds): 0.5, 1, 2, 4, 5, 5, ...
FIRST_DELAY = 0.5
MAX_DELAY = 5.0

T = TypeVar("T")


class Outage:
    """The state of one loop's Redis connection: healthy, or failing since some attempt."""

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        first: float = FIRST_DELAY,
        cap: float = MAX_DELAY,
    ) -> None:
        self._what = what
        self._log = logger
        # redis-py's own back-off: min(cap, base * 2 ** failures), failures counted from 0.
        self._backoff = ExponentialBackoff(cap=cap, base=first)
        self.failures = 0

    @property
    def ongoing(self) -> bool:
        """True between a failure and the next success."""
        return self.failures > 0

    def failed(self, exc: BaseException) -> float:
        """Record a failed attempt; returns the seconds to wait before the next one."""
        if self.failures == 0:
            self._log.error("%s: Redis unavailable, retrying with back-off: %r", self._what, exc)
        else:
            self._log.debug("%s: Redis still unavailable: %r", self._what, exc)
        delay = float(self._backoff.compute(self.failures))
        self.failures += 1
        return delay

    def recovered(self) -> bool:
        """Record a successful attempt; True when it ended an outage (logged once)."""
        if self.failures == 0:
            return False
        self._log.info("%s: Redis is back after %d failed attempt(s)", self._what, self.failures)
        self.failures = 0
        return True


def until_available(
    call: Callable[[], T], stop: threading.Event, what: str, logger: logging.Logger
) -> T | None:
    """``call()``, retried through Redis errors with capped back-off until it succeeds.

    Returns None (without calling again) once ``stop`` is set: a process told to stop
    while Redis is away stops instead of waiting for it.
    """
    outage = Outage(what, logger)
    while not stop.is_set():
        try:
            result = call()
        except redis.RedisError as exc:
            stop.wait(outage.failed(exc))
            continue
        outage.recovered()
        return result
    return None
