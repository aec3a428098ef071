"""Starting worker processes, and adopting what an earlier supervisor left behind.

A worker runs :func:`workers.worker.process.main` with its device in ``CUDA_VISIBLE_DEVICES``,
set before anything can initialise CUDA, so it never sees another GPU. It runs in its
own session, so a Ctrl-C aimed at the supervisor does not bypass the supervisor's
orderly drain, and it outlives its supervisor: a supervisor that starts adopts the live
workers an earlier one of its host left (:func:`adopt_leftovers`), so a supervisor crash
costs no request. A worker left without a supervisor drains itself once its slot lease
has been gone for ``LEASE_GRACE`` (``workers.worker.heartbeat``).

Two ways to start one:

* :class:`ForkSpawner` (the default) forks the supervisor, which has already imported
  Celery, kombu, redis and mqserve: a worker starts in milliseconds instead of paying
  the interpreter start and imports again. This is safe because the supervisor is
  single-threaded and never imports torch or touches CUDA; the child closes every
  inherited descriptor before it does anything.
* :class:`WorkerSpawner` starts ``python -m workers.worker.process`` afresh (``exec``), for
  hosts that prefer full isolation over start-up speed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

import psutil
import redis

from control.core import keys, observed
from control.core.devices import device_token
from workers.model_files import PRIVATE_DIR, ModelFiles
from workers.supervisor.plan import EXIT_UNKNOWN

log = logging.getLogger(__name__)


class WorkerProcess(Protocol):
    """The part of ``subprocess.Popen`` the supervisor uses."""

    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def worker_argv(wid: str, model: str, version: str, slot: int, gpu: int, host: str) -> list[str]:
    """The worker's command-line arguments (after ``python -m workers.worker.process``)."""
    return [
        "--wid", wid, "--model", model, "--version", version,
        "--slot", str(slot), "--gpu", str(gpu), "--host", host,
    ]  # fmt: skip


def worker_env(settings_file: Path, gpu: int) -> dict[str, str]:
    """Environment additions for a worker: its settings and its one GPU (or none)."""
    return {
        "MQSERVE_SETTINGS": str(settings_file),
        # The worker sees only its own GPU (as cuda:0), or none at all.
        "CUDA_VISIBLE_DEVICES": device_token(gpu) if gpu >= 0 else "",
        "PYTHONUNBUFFERED": "1",
    }


class WorkerSpawner:
    """Starts workers as fresh interpreters (implements ``Spawner``)."""

    def __init__(self, settings_file: Path, host: str, log_dir: Path) -> None:
        self._settings_file = settings_file
        self._host = host
        self._log_dir = log_dir

    def __call__(self, wid: str, model: str, version: str, slot: int, gpu: int) -> WorkerProcess:
        argv = [
            sys.executable, "-m", "workers.worker.process",
            *worker_argv(wid, model, version, slot, gpu, self._host),
        ]  # fmt: skip
        env = {**os.environ, **worker_env(self._settings_file, gpu)}
        self._log_dir.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)  # logs hold tracebacks
        with (self._log_dir / f"worker-{wid}.log").open("ab") as out:
            return subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


class ForkedWorker:
    """A forked worker, with the ``Popen`` methods the supervisor needs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(0.01)
        return code


class ForkSpawner(WorkerSpawner):
    """Starts workers by forking this (single-threaded, torch-free) supervisor."""

    def __call__(self, wid: str, model: str, version: str, slot: int, gpu: int) -> WorkerProcess:
        argv = worker_argv(wid, model, version, slot, gpu, self._host)
        env = worker_env(self._settings_file, gpu)
        self._log_dir.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)  # logs hold tracebacks
        log_path = self._log_dir / f"worker-{wid}.log"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child; covered by the integration tests
            _become_worker(argv, env, log_path)
        return ForkedWorker(pid)


def _become_worker(argv: list[str], env: dict[str, str], log_path: Path) -> NoReturn:
    """In the forked child: detach, redirect, then run the worker; never returns."""
    code = 70
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        # The supervisor's Redis and pub/sub sockets must not live on in the worker.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.environ.update(env)
        from workers.worker import process

        code = process.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # report anything, then leave the child
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class AdoptedWorker:
    """A live worker an earlier supervisor of this host started, with the ``Popen``
    methods the supervisor needs. It is not our child: its exit status cannot be read
    (``returncode`` becomes :data:`workers.supervisor.plan.EXIT_UNKNOWN`), and psutil checks
    the process's identity (its start time) before every signal, so a reused pid is
    never signalled."""

    def __init__(self, proc: psutil.Process) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                gone = not self._proc.is_running() or self._proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                self.returncode = EXIT_UNKNOWN
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(0.01)
        return code


@dataclass(frozen=True)
class Leftover:
    """A worker of this host that an earlier supervisor started: adopted (its live
    ``process``), or found dead (None: its requests and batch chunk need answering)."""

    record: observed.WorkerRecord
    process: AdoptedWorker | None


def adopt_leftovers(
    client: redis.Redis, host: str, files: ModelFiles, timeout: float = 15.0
) -> list[Leftover]:
    """Take over what an earlier supervisor of ``host`` left; returns the adopted workers
    and, with no process, those whose record outlived them.

    A worker is adopted when its process is alive (the very process its record names:
    created before the record) and its slot lease is still this host's, or free (then
    it is claimed for this host again). A worker whose slot another host took meanwhile
    is stopped (drained, then killed after ``timeout``); records of dead workers,
    leases of this host that no adopted worker holds and model files that no adopted
    worker uses are deleted. Redis errors propagate (the caller retries).
    """
    adopted: list[Leftover] = []
    dead: list[Leftover] = []
    lease_ms = int(observed.LEASE_SECONDS * 1000)
    for record in _records_of(client, host):
        proc = _same_process(record.pid, record.started_at)
        lease = keys.slot(record.model, record.version, record.slot)
        if proc is None:
            dead.append(Leftover(record, None))
        elif record.slot >= 0 and (
            client.get(lease) == host or client.set(lease, host, nx=True, px=lease_ms)
        ):
            log.info("adopting worker %s (pid %d) of %s:%s", record.wid, proc.pid,
                     record.model, record.version)  # fmt: skip
            adopted.append(Leftover(record, AdoptedWorker(proc)))
            continue
        else:  # its slot went to another host meanwhile (or the record names none)
            log.info("stopping leftover worker %s (pid %d): its slot has moved", record.wid,
                     proc.pid)  # fmt: skip
            _stop(proc, timeout)
        observed.remove(client, record)
    held = {keys.slot(a.record.model, a.record.version, a.record.slot) for a in adopted}
    for key in client.scan_iter(match=keys.slot("*", "*", "*"), count=200):
        if key not in held and client.get(key) == host:
            client.delete(key)
    files.keep_only({(a.record.model, a.record.version) for a in adopted})
    return adopted + dead


def _records_of(client: redis.Redis, host: str) -> list[observed.WorkerRecord]:
    records = []
    for key in client.scan_iter(match=keys.worker("*"), count=200):
        record = observed.read(client, str(key).rsplit(":", 1)[-1])
        if record is not None and record.host == host:
            records.append(record)
    return records


def _same_process(pid: int, started_at: float) -> psutil.Process | None:
    """The live process ``pid`` if it is the one that wrote a record at ``started_at``."""
    if pid <= 0 or pid in (os.getpid(), os.getppid()):
        return None
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        zombie = proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return None
    # A process created after the worker wrote its record is an unrelated one that
    # reused the pid (forked workers share the supervisor's command line, so the
    # command line cannot tell).
    return None if zombie or created > started_at + 1.0 else proc


def _stop(proc: psutil.Process, timeout: float) -> None:
    with contextlib.suppress(psutil.Error):
        proc.terminate()
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
