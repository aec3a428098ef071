"""A fake worker fleet: plays supervisor and workers by writing observed records.

The management API only learns about workers through their records in Redis, so a
fleet that keeps records in line with the desired counts is an exact stand-in for
the real supervisor as far as the API is concerned. Integration tests use the real
supervisor and real worker processes instead.

:class:`FakeProcess` is the other way round: one worker process under the real
supervisor (``tests/unit/test_supervisor.py``).
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from control.core import keys, observed
from control.core.observed import WorkerRecord, WorkerState
from control.core.registry import Registry
from control.core.spec import ModelSpec

#: Records written by the fake live long: the fake has no heartbeat thread.
_TTL = 3600.0


class FakeFleet:
    """Keeps worker records of every registered version between min and max workers.

    ``fail`` decides, per spec, the failure reason of new workers ("" means they load);
    versions in ``stuck`` never lose workers (to test drain timeouts).
    """

    def __init__(self, client: redis.Redis, fail: Callable[[ModelSpec], str] | None = None) -> None:
        self._r = client
        self._registry = Registry(client)
        self._fail = fail or (lambda spec: "")
        self.stuck: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> None:
        """One reconcile pass."""
        desired = {(r.spec.model_name, r.spec.version): r for r in self._registry.desired()}
        for key in self._r.scan_iter(match=f"{keys.PREFIX}:o:workers:*"):
            _, _, _, name, ver = str(key).split(":")
            if (name, ver) not in desired and (name, ver) not in self.stuck:
                for record in observed.workers_of(self._r, name, ver):
                    observed.remove(self._r, record)
        for (name, ver), record in desired.items():
            current = observed.workers_of(self._r, name, ver)
            for _ in range(record.min_workers - len(current)):
                self._start(record.spec)
            if (name, ver) in self.stuck:
                continue
            for extra in current[max(record.max_workers, 0) :]:
                observed.remove(self._r, extra)

    def _start(self, spec: ModelSpec) -> None:
        reason = self._fail(spec)
        record = WorkerRecord(
            wid=observed.new_worker_id(self._r),
            model=spec.model_name,
            version=spec.version,
            host="fakehost",
            pid=4242,
            gpu=-1,
            state=WorkerState.FAILED if reason else WorkerState.READY,
            started_at=observed.now(),
            memory=123456,
            reason=reason,
        )
        observed.publish(self._r, record, ttl=_TTL)

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.step()

    @contextmanager
    def running(self) -> Iterator[FakeFleet]:
        """Run :meth:`step` continuously in a background thread."""
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=5)


class FakeProcess:
    """A worker process as the supervisor sees it (``workers.supervisor.spawn.WorkerProcess``).

    It runs until it is signalled or told to :meth:`exit`. SIGTERM makes it drain and
    exit 0 at once, unless ``ignores_sigterm`` (a handler stuck in a call); SIGKILL
    always ends it (-9). :meth:`wait` never sleeps: a process still running at its
    call raises ``TimeoutExpired`` as ``Popen.wait`` would once ``timeout`` passed,
    and records the timeout it was given.
    """

    def __init__(self, pid: int, ignores_sigterm: bool = False) -> None:
        self.pid = pid
        self.ignores_sigterm = ignores_sigterm
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.waits: list[float | None] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        assert self.returncode is None, "signal sent to a process that has exited"
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.returncode = -signal.SIGKILL
        elif sig == signal.SIGTERM and not self.ignores_sigterm:
            self.returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        self.waits.append(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
        return self.returncode

    def exit(self, code: int) -> None:
        """The process ends by itself with ``code`` (negative: killed by that signal)."""
        self.returncode = code
