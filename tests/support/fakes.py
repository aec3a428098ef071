"""Fake worker processes for the real supervisor, and a fleet of them for the API tests.

:class:`FakeProcess` is one worker process as the supervisor sees it
(``tests/unit/test_supervisor.py`` drives it by hand). :class:`FakeWorker` is a
:class:`FakeProcess` that also does what a model worker does to its record: it loads its
model with the real worker's code and reports LOADING, then READY or FAILED with the
real reason. :class:`FakeFleet` runs the real :class:`workers.supervisor.loop.Supervisor`
over such workers in a background thread, so the management API's tests see the worker
counts, slots, back-offs, timeouts and failure texts the real supervisor and workers
produce, without processes. Integration tests use real worker processes instead.
"""

from __future__ import annotations

import itertools
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from control.archives.store import model_store
from control.core.observed import WorkerRecord, WorkerState
from control.core.registry import Registry
from control.core.settings import Settings
from tests.support.handlers import isolated_imports
from workers.handling.loader import LoadError, load_handler
from workers.handling.service import LoadedModel
from workers.supervisor.loop import Supervisor
from workers.worker.heartbeat import Reporter
from workers.worker.process import (
    EXIT_LOAD_FAILED,
    EXIT_OUT_OF_MEMORY,
    read_metrics_config,
    unpack_model,
)

log = logging.getLogger(__name__)

#: Pause between two rounds of the fleet (a supervisor tick, then a step of each worker):
#: short, because a synchronous register's latency includes a few rounds.
ROUND_SECONDS = 0.01


class FakeFleet:
    """The real supervisor of host ``fakehost``, running in-process fake workers.

    Each round (:meth:`step`) ticks the supervisor, then advances every live worker by
    one step; :meth:`running` does rounds in a background thread. The supervisor reads
    ``settings`` (``home`` for unpacked archives, ``worker_spawn_timeout``) and the
    workers load from ``settings.model_store``. Workers of the versions in ``stuck``
    ignore SIGTERM entirely (hung in native code: not even their signal handler runs),
    so they keep serving and a drain can only time out (the supervisor would SIGKILL
    them after ``response_timeout`` + ``DRAIN_GRACE``, longer than any test).
    """

    def __init__(self, client: redis.Redis, settings: Settings, host: str = "fakehost") -> None:
        self._r = client
        self._settings = settings
        self.stuck: set[tuple[str, str]] = set()
        #: Every worker process spawned, in order (a slot's retry reuses its worker id).
        self.spawned: list[FakeWorker] = []
        self._pids = itertools.count(20_000)
        self.supervisor = Supervisor(settings, client, host, self._spawn)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _spawn(self, wid: str, model: str, version: str, slot: int, gpu: int) -> FakeWorker:
        """The supervisor's spawner: a :class:`FakeWorker` instead of a forked process."""
        key = (model, version)
        identity = WorkerRecord(
            wid, model, version, self.supervisor.host, -1, gpu, WorkerState.LOADING, 0.0, slot=slot
        )
        worker = FakeWorker(
            next(self._pids), self._r, self._settings, identity, stuck=lambda: key in self.stuck
        )
        self.spawned.append(worker)
        return worker

    def step(self) -> None:
        """One round: a supervisor tick, then one step of every worker still running."""
        self.supervisor.tick()
        for worker in list(self.spawned):
            worker.advance()

    def _loop(self) -> None:
        try:
            while not self._stop.wait(ROUND_SECONDS):
                self.step()
        except BaseException as exc:  # re-raised in the test by running()
            log.exception("fake fleet round failed")
            self._error = exc

    @contextmanager
    def running(self) -> Iterator[FakeFleet]:
        """Do rounds in a background thread; on exit, stop it and shut the supervisor
        down (every worker drained or killed, records and leases gone). An error in a
        round stops the rounds and is raised here, failing the test."""
        self._thread = threading.Thread(target=self._loop, name="fake-fleet", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)
            try:
                self.supervisor.shutdown(timeout=0)
            finally:
                for worker in self.spawned:
                    worker.stop_beating()
        if self._error is not None:
            raise AssertionError("a round of the fake fleet failed") from self._error


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


class FakeWorker(FakeProcess):
    """One model worker, in-process, as ``workers.worker.process`` runs it.

    Its life is advanced by :meth:`advance`, one step per fleet round, so the supervisor
    observes each state for at least one tick (a real load takes far longer than a
    tick): the first step reports LOADING and starts the real heartbeat
    (``workers.worker.heartbeat.Reporter``) for the worker the supervisor started
    (``record``'s wid, model, version, host, gpu and slot); the second
    loads the model as ``workers.worker.process`` does (the real ``unpack_model`` and
    ``load_handler``, metrics config included) and reports READY, or FAILED with the
    loader's reason and exits with the worker's exit code (3, or 4 out of memory).
    What it does not do is the process-wide part of a load (``enter_model_dir``: the
    cwd is shared by every test), and the handler's modules are imported in isolation
    (``tests.support.handlers.isolated_imports``), since archives share module names.
    Nor does it serve: no online loop, Celery consumer or metrics flusher, and no lease
    guard (the fleet is one host, whose supervisor never loses a slot to another).

    SIGTERM reports DRAINING and exits 0 (a drain with nothing in flight), unless
    ``stuck()`` says the worker ignores it; SIGKILL ends it; either way the heartbeat
    stops, as it does when a process ends.
    """

    def __init__(
        self,
        pid: int,
        client: redis.Redis,
        settings: Settings,
        record: WorkerRecord,
        stuck: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(pid)
        self._r = client
        self._settings = settings
        self._stuck = stuck
        started = time.time()
        self.reporter = Reporter(
            client,
            WorkerRecord(
                record.wid,
                record.model,
                record.version,
                record.host,
                pid,
                record.gpu,
                WorkerState.LOADING,
                started,
                since=started,
                heartbeat=started,
                slot=record.slot,
            ),
        )
        self._beating = False
        #: The model once loaded.
        self.model: LoadedModel | None = None

    @property
    def state(self) -> WorkerState:
        return self.reporter.record.state

    def advance(self) -> None:
        """The worker's next step (nothing once it has exited or while it serves)."""
        if self.returncode is not None:
            return
        if not self._beating:
            self._beating = True
            self.reporter.set_state(WorkerState.LOADING)
            self.reporter.start()
        elif self.state is WorkerState.LOADING:
            self._load()

    def _load(self) -> None:
        record = self.reporter.record
        try:
            metrics_config = read_metrics_config(self._settings)
            version = Registry(self._r).get(record.model, record.version)
            root = unpack_model(self._settings, model_store(self._settings), record.host, version)
            with isolated_imports(root):
                self.model = load_handler(root, version.spec, None, metrics_config)
        except LoadError as exc:
            self.reporter.set_state(WorkerState.FAILED, str(exc))
            self._end(EXIT_OUT_OF_MEMORY if exc.oom else EXIT_LOAD_FAILED)
            return
        except Exception:  # what would end the real process with a traceback
            log.exception("fake worker %s crashed while loading", record.wid)
            self._end(1)
            return
        self.reporter.set_state(WorkerState.READY)

    def send_signal(self, sig: int) -> None:
        if sig == signal.SIGTERM:
            self.ignores_sigterm = self._stuck()
            if not self.ignores_sigterm:
                self.reporter.set_state(WorkerState.DRAINING)
        super().send_signal(sig)
        if self.returncode is not None:
            self.stop_beating()

    def _end(self, code: int) -> None:
        self.exit(code)
        self.stop_beating()

    def stop_beating(self) -> None:
        """Stop the heartbeat thread (the process has ended, or the test has)."""
        self.reporter.stop()
