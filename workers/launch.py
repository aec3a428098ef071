"""Starting worker processes, and clearing what an earlier supervisor left behind.

A worker runs :func:`workers.process.main` with its device in ``CUDA_VISIBLE_DEVICES``,
set before anything can initialise CUDA, so it never sees another GPU. It gets
``PR_SET_PDEATHSIG`` so it is told to drain if its supervisor dies, and its own session
so a Ctrl-C aimed at the supervisor does not bypass the supervisor's orderly drain.

Two ways to start one:

* :class:`ForkSpawner` (the default) forks the supervisor, which has already imported
  Celery, kombu, redis and mqserve: a worker starts in milliseconds instead of paying
  the interpreter start and imports again. This is safe because the supervisor is
  single-threaded and never imports torch or touches CUDA; the child closes every
  inherited descriptor before it does anything.
* :class:`WorkerSpawner` starts ``python -m workers.process`` afresh (``exec``), for
  hosts that prefer full isolation over start-up speed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn, Protocol

import psutil
import redis

from control import keys, observed

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class WorkerProcess(Protocol):
    """The part of ``subprocess.Popen`` the supervisor uses."""

    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def worker_argv(wid: str, model: str, version: str, slot: int, gpu: int, host: str) -> list[str]:
    """The worker's command-line arguments (after ``python -m workers.process``)."""
    return [
        "--wid", wid, "--model", model, "--version", version,
        "--slot", str(slot), "--gpu", str(gpu), "--host", host,
    ]  # fmt: skip


def worker_env(settings_file: Path, gpu: int) -> dict[str, str]:
    """Environment additions for a worker: its settings and its one GPU (or none)."""
    return {
        "MQSERVE_SETTINGS": str(settings_file),
        # The worker sees only its own GPU (as cuda:0), or none at all.
        "CUDA_VISIBLE_DEVICES": str(gpu) if gpu >= 0 else "",
        "PYTHONUNBUFFERED": "1",
    }


def model_dir(host: str, wid: str) -> Path:
    """Where worker ``wid`` unpacks its archive; removed by the supervisor after exit."""
    return Path(tempfile.gettempdir()) / "mqserve-models" / f"{host}-{wid}"


class WorkerSpawner:
    """Starts workers as fresh interpreters (implements ``Spawner``)."""

    def __init__(self, settings_file: Path, host: str, log_dir: Path) -> None:
        self._settings_file = settings_file
        self._host = host
        self._log_dir = log_dir

    def __call__(self, wid: str, model: str, version: str, slot: int, gpu: int) -> WorkerProcess:
        argv = [
            sys.executable, "-m", "workers.process",
            *worker_argv(wid, model, version, slot, gpu, self._host),
        ]  # fmt: skip
        env = {**os.environ, **worker_env(self._settings_file, gpu)}
        self._log_dir.mkdir(parents=True, exist_ok=True)
        with (self._log_dir / f"worker-{wid}.log").open("ab") as out:
            return subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
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
        self._log_dir.mkdir(parents=True, exist_ok=True)
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
        _die_with_parent()
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
        from workers import process

        code = process.main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # report anything, then leave the child
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def replace_leftovers(client: redis.Redis, host: str, timeout: float = 15.0) -> int:
    """Stop workers and drop leases an earlier supervisor of ``host`` left; returns count.

    A supervisor that was killed takes its workers with it (PDEATHSIG), but their
    records and slot leases outlive it for a few seconds, and a worker may still be
    draining. Starting clean is simpler and safer than adopting processes this
    supervisor cannot reap.
    """
    stale = []
    for key in client.scan_iter(match=keys.worker("*"), count=200):
        record = observed.read(client, str(key).rsplit(":", 1)[-1])
        if record is not None and record.host == host:
            stale.append(record)
    for record in stale:
        _stop_leftover(record.pid, record.wid, record.started_at, timeout)
        observed.remove(client, record)
    for key in client.scan_iter(match=keys.slot("*", "*", "*"), count=200):
        if client.get(key) == host:
            client.delete(key)
    return len(stale)


def _stop_leftover(pid: int, wid: str, started_at: float, timeout: float) -> None:
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
    except (psutil.Error, ValueError):
        return
    # A process created after the worker wrote its record is an unrelated one that
    # reused the pid (forked workers share the supervisor's command line, so the
    # command line cannot tell).
    if pid in (os.getpid(), os.getppid()) or created > started_at + 1.0:
        return
    log.info("stopping leftover worker %s (pid %d)", wid, pid)
    proc.terminate()
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def remove_model_dir(host: str, wid: str) -> None:
    """Delete a worker's unpacked archive (after the worker exited)."""
    path = model_dir(host, wid)
    shutil.rmtree(path, ignore_errors=True)
