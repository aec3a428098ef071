"""Redis clients with explicit timeouts, and blocking reads that honour any deadline.

redis-py's defaults are wrong for this design: a 5 s ``socket_timeout`` (redis-py 8)
ends any blocking command that waits longer, so a model slower than 5 s, or a 6 s
batching window, used to fail with a timeout error. Every client mqserve builds comes
from here, with these settings:

* ``socket_connect_timeout`` = :data:`CONNECT_TIMEOUT`: Redis is local or on the same
  network; a connect that takes longer means it is not there.
* ``socket_timeout`` = :data:`SOCKET_TIMEOUT`: the longest any single command may take
  to answer before the connection counts as dead (a Redis that vanished without closing
  TCP). No single blocking command ever blocks longer than :data:`BLOCK_CHUNK`, well
  inside it; longer waits are loops of blocking calls (:func:`block_for`), so a wait of
  any length (a model's ``response_timeout``, a batching window) never meets the socket
  timeout, and a dead Redis is still noticed within ``SOCKET_TIMEOUT``.
* ``health_check_interval`` = 25 s: a connection idle that long is PINGed before use.

A long-running process builds its clients once, at its edge (:func:`connect`: one
decoding and one bytes client, one connection pool per role), and passes them down to
everything in it that talks to Redis: a model worker (``workers.worker.process.main``), a
supervisor (``workers.supervisor.run.run_supervisor``), an API process
(``control.server.process_clients``); an ASGI app's asyncio client comes from
:func:`connect_async`, with the same timeouts. Celery's broker connections are kombu's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

CONNECT_TIMEOUT = 5.0
SOCKET_TIMEOUT = 30.0
#: The longest one blocking command (BLPOP, BLMOVE) may block.
BLOCK_CHUNK = 2.0
#: Redis reads a blocking timeout in milliseconds and treats 0 as "forever": never ask
#: for less than this.
MIN_BLOCK = 0.002
HEALTH_CHECK_INTERVAL = 25

T = TypeVar("T")


def redis_client(url: str) -> redis.Redis:
    """A thread-safe client (connection pool) returning ``str`` values."""
    return _client(url, decode_responses=True)


def redis_bytes_client(url: str) -> redis.Redis:
    """A client returning ``bytes``: for request and reply frames, which carry raw data."""
    return _client(url, decode_responses=False)


@dataclass(frozen=True)
class Clients:
    """The Redis clients of one process, built once at its edge (:func:`connect`) and
    passed down to everything in it that talks to Redis.

    ``text`` decodes replies to ``str`` (registry, records, leases, metrics, jobs);
    ``frames`` returns ``bytes`` (request and reply frames, which carry raw data). They
    cannot share one pool (decoding is a setting of the connections), so a process holds
    two: one per role. Each is a thread-safe pool shared by all the process's threads,
    and reconnects by itself after an outage, so nobody needs a fresh client.
    """

    text: redis.Redis
    frames: redis.Redis


def connect(url: str) -> Clients:
    """The two clients of one process; connects lazily (nothing is sent yet)."""
    return Clients(redis_client(url), redis_bytes_client(url))


def connect_async(url: str, decode_responses: bool = False) -> redis.asyncio.Redis:
    """An asyncio client (``redis.asyncio``, parsing with hiredis when installed) with the
    same timeouts as the sync ones; returns ``bytes`` unless ``decode_responses``.

    For the ASGI apps: one per event loop (a process's loop), built at its edge like the
    sync clients, connecting lazily. Its pool is bound to the loop that first uses it.

    One immediate retry on a connection error (``from_url`` sets none): after a Redis
    restart every pooled connection is dead and fails its next command once; the retry
    reconnects, so requests sent once Redis is back are served. The price: a command
    whose connection broke after Redis ran it runs twice (a request frame pushed twice
    is answered twice; the reply listener keeps the first).
    """
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 1),
        decode_responses=decode_responses,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )
    return client


def _client(url: str, decode_responses: bool) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )


def text(value: object) -> str:
    """A Redis value as ``str``: bytes (from a client that does not decode) are UTF-8,
    anything else goes through ``str()``. Lets code read Redis with either client
    (redis-py types its replies loosely, hence ``object``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def block_seconds(remaining: float) -> float:
    """The timeout for one blocking command when ``remaining`` seconds are left."""
    return min(max(remaining, MIN_BLOCK), BLOCK_CHUNK)


def block_for(
    call: Callable[[float], T | None],
    timeout: float,
    between: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T | None:
    """Repeat the blocking ``call(seconds)`` until it returns a value or ``timeout`` ends.

    ``between()`` runs after every empty chunk; returning False ends the wait early
    (the caller learned the value will never come). Returns None when nothing came.
    """
    deadline = clock() + timeout
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        value = call(block_seconds(remaining))
        if value is not None:
            return value
        if between is not None and not between():
            return None
