"""Chaos-test bookkeeping shared by every chaos test module: a bounded load, its
accounting, and the figures table printed at the end of the pytest run.

Vocabulary (the same in every module that reports here):

* **answered**: 200 whose body is the request's own token (the echo handler returns it).
* **failed**: a TorchServe-shaped error answer (``{"code", "type", "message"}``, e.g. a
  503 or a 500 ``Worker died.``), or a connection refused or reset, seen by the client
  at once.
* **lost**: no answer within the client's deadline, an answer that is not the
  request's own (a 200 with another body), or an error that is not TorchServe-shaped.

Each tier's ``conftest.py`` calls :func:`terminal_summary` from its
``pytest_terminal_summary`` hook, so CI's log shows one row per recorded fault:
``fault | sent | answered | failed | lost | converged in s``.
"""

from __future__ import annotations

import enum
import http.client
import itertools
import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


class Outcome(enum.StrEnum):
    """What one request of a chaos load came to (see the module docstring)."""

    ANSWERED = "answered"
    FAILED = "failed"
    LOST = "lost"


def is_torchserve_error(body: bytes) -> bool:
    """True when ``body`` is TorchServe's JSON error: an object with code, type, message."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and {"code", "type", "message"} <= doc.keys()


def classify(token: str, status: int, body: bytes) -> Outcome:
    """The outcome of an HTTP answer to the request that carried ``token``."""
    if status == 200:
        return Outcome.ANSWERED if body == token.encode() else Outcome.LOST
    return Outcome.FAILED if is_torchserve_error(body) else Outcome.LOST


@dataclass(frozen=True)
class Tally:
    """Counts of requests by outcome."""

    sent: int = 0
    answered: int = 0
    failed: int = 0
    lost: int = 0


@dataclass(frozen=True)
class Shot:
    """One request of a load: when it was sent (``time.monotonic()``) and its outcome."""

    token: str
    sent_at: float
    outcome: Outcome
    #: The status, or the exception's class name when no HTTP answer came.
    detail: str


class Load:
    """A bounded HTTP load: ``threads`` clients POSTing unique tokens to ``url``.

    ``rate`` is requests per second over all threads; a client whose request takes
    longer than its interval sends its next one at once, without catching up, so the
    rate is a ceiling. Every request has a client timeout of ``timeout`` seconds (a
    request without an answer by then is lost). Use as a context manager: leaving it
    stops the clients and waits for the requests they have in flight (at most
    ``timeout`` seconds). Thread-safe to read while it runs.
    """

    def __init__(
        self,
        url: str,
        *,
        threads: int = 2,
        rate: float = 10.0,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        self._host = str(parts.hostname)
        self._port = parts.port or 80
        self._path = parts.path or "/"
        self._threads = threads
        self._interval = threads / rate
        self._timeout = timeout
        self._headers = {"Content-Type": "text/plain", **(headers or {})}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._shots: list[Shot] = []
        self._workers: list[threading.Thread] = []
        self._counter = itertools.count()

    def __enter__(self) -> Load:
        for i in range(self._threads):
            thread = threading.Thread(target=self._client, args=(i,), name=f"load-{i}")
            thread.start()
            self._workers.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sending and wait for every request in flight to end."""
        self._stop.set()
        for thread in self._workers:
            thread.join(self._timeout + 5)

    def shots(self, since: float = 0.0, until: float = float("inf")) -> list[Shot]:
        """Requests sent in ``[since, until)`` (``time.monotonic()`` values) that ended."""
        with self._lock:
            return [s for s in self._shots if since <= s.sent_at < until]

    def tally(self, since: float = 0.0, until: float = float("inf")) -> Tally:
        """Counts of the requests sent in ``[since, until)`` that have ended."""
        shots = self.shots(since, until)
        by = {o: sum(1 for s in shots if s.outcome is o) for o in Outcome}
        return Tally(len(shots), by[Outcome.ANSWERED], by[Outcome.FAILED], by[Outcome.LOST])

    def _client(self, index: int) -> None:
        # Threads start staggered so that the load is spread evenly over each interval.
        next_at = time.monotonic() + index * self._interval / self._threads
        while not self._stop.wait(max(next_at - time.monotonic(), 0.0)):
            token = f"chaos-{next(self._counter)}-{uuid.uuid4().hex}"
            sent_at = time.monotonic()
            outcome, detail = self._send(token)
            with self._lock:
                self._shots.append(Shot(token, sent_at, outcome, detail))
            next_at = max(next_at + self._interval, time.monotonic())

    def _send(self, token: str) -> tuple[Outcome, str]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.request("POST", self._path, body=token.encode(), headers=self._headers)
            response = conn.getresponse()
            body = response.read()
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            # Seen at once (RemoteDisconnected is a reset): the client knows to retry.
            return Outcome.FAILED, type(exc).__name__
        except (OSError, http.client.HTTPException) as exc:
            # A timeout, or a broken answer: the client does not know what happened.
            return Outcome.LOST, type(exc).__name__
        finally:
            conn.close()
        return classify(token, response.status, body), str(response.status)


@dataclass(frozen=True)
class Row:
    """One line of the figures table."""

    fault: str
    tally: Tally
    #: Seconds from the fault until the stack was back to its desired state (None: n/a).
    converged_s: float | None


_ROWS: list[Row] = []
_ROWS_LOCK = threading.Lock()
#: Rows already printed: every tier's conftest has the hook, and one pytest run of
#: several tiers must print each row once.
_PRINTED = 0


def record(fault: str, tally: Tally, converged_s: float | None) -> None:
    """Add a row to the figures table printed at the end of the run."""
    with _ROWS_LOCK:
        _ROWS.append(Row(fault, tally, converged_s))


def rows() -> list[Row]:
    """The rows recorded so far in this pytest process."""
    with _ROWS_LOCK:
        return list(_ROWS)


def table(recorded: list[Row]) -> list[str]:
    """``recorded`` as aligned text lines, a header first."""
    header = ("fault", "sent", "answered", "failed", "lost", "converged in s")
    cells = [header] + [
        (
            r.fault,
            str(r.tally.sent),
            str(r.tally.answered),
            str(r.tally.failed),
            str(r.tally.lost),
            "-" if r.converged_s is None else f"{r.converged_s:.1f}",
        )
        for r in recorded
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    # The fault column is left-aligned, the figures right-aligned.
    lines = [
        " | ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


class _Reporter(Protocol):
    def write_sep(self, sep: str, title: str) -> None: ...

    def write_line(self, line: str) -> None: ...


def terminal_summary(terminalreporter: _Reporter) -> None:
    """Print the figures table, if any chaos test recorded a row (a conftest hook calls this)."""
    global _PRINTED
    recorded = rows()[_PRINTED:]
    _PRINTED += len(recorded)
    if not recorded:
        return
    terminalreporter.write_sep("=", "chaos figures")
    for line in table(recorded):
        terminalreporter.write_line(line)
