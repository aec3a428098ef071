"""Real processes for the integration and acceptance tiers: redis-server, gunicorn apps,
supervisors.

Every helper that starts a process registers its stop the moment the process exists
(:func:`started`), so a start-up check that fails, a test that fails, or a second
process that fails to start stops what was started and closes its log: nothing is left
running and no ResourceWarning follows. ``tests/integration/test_fixture_hygiene.py``
checks exactly that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import psutil
import redis

from control.core import keys
from control.core.home import Home, alive, live_pid
from control.core.settings import Settings
from control.stack.children import worker_args


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``condition`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, redis.RedisError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _below(pid: int) -> list[psutil.Process]:
    """The processes below ``pid`` now (empty once it is gone)."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def stop_process(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """Stop ``proc`` and everything that was below it; return once all have exited.

    SIGTERM first, and ``grace`` seconds for a clean exit (a gunicorn master stops its
    workers, a supervisor drains its own); then SIGKILL for ``proc`` and whatever ran
    below it (snapshotted before each signal, since a killed parent's children are
    re-parented and can no longer be found from it). Safe to call on a process that
    already exited; reaps it, so no ``Popen`` is left to warn that it still runs.
    """
    below = _below(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            below += _below(proc.pid)
            proc.kill()
            proc.wait(30)
    for child in below:  # psutil checks the start time: a reused pid is not touched
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(below, timeout=10)


@contextmanager
def started(
    argv: list[str],
    *,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    grace: float = 15.0,
    stdin: bytes | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` as a child process, its output in ``log`` (or discarded), ``stdin`` fed
    to it; stopped with :func:`stop_process` and the log closed on exit.

    The stop is registered the moment the process exists, so whatever fails after (a
    start-up check in the caller, the test body) can neither leave the process running
    nor the log file open.
    """
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("wb")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            argv,
            env=None if env is None else dict(env),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        stack.callback(stop_process, proc, grace)
        if proc.stdin is not None:
            with proc.stdin:
                proc.stdin.write(stdin or b"")
        yield proc


def pings(url: str) -> bool:
    """True when the Redis at ``url`` answers PING (the client is closed again)."""
    with redis.Redis.from_url(url) as client:
        return bool(client.ping())


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise AssertionError("redis-server is required: apt-get install -y redis-server")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    with started(argv, grace=10):
        wait_for(lambda: pings(url), 10, "redis-server")
        yield url


@contextmanager
def api_process(settings: Settings, workdir: Path, app: str = "management") -> Iterator[str]:
    """One API app under gunicorn, exactly as the launcher runs it; yields its URL.

    ``app`` is ``management``, ``inference`` or ``metrics``. The gunicorn master and its
    worker are stopped on exit, also when the start-up check or the test fails.
    """
    port = free_port()
    settings = settings.replace(**{f"{app}_address": f"http://127.0.0.1:{port}"})
    workdir.mkdir(parents=True, exist_ok=True)
    settings_file = workdir / f"settings-{port}.json"
    settings_file.write_text(settings.to_json())
    log_path = workdir / f"gunicorn-{app}-{port}.log"
    argv = [sys.executable, "-m", "gunicorn", f"control.server:{app}_app()",
            "--bind", f"127.0.0.1:{port}", *worker_args(app, 16),
            "--workers", "1", "--no-control-socket"]  # fmt: skip
    env = {**os.environ, "MQSERVE_SETTINGS": str(settings_file)}
    with started(argv, log=log_path, env=env, grace=15) as proc:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 30, "gunicorn")
        assert proc.poll() is None, log_path.read_text()
        yield f"http://127.0.0.1:{port}"


def management_process(settings: Settings, workdir: Path) -> AbstractContextManager[str]:
    """The management app under gunicorn; yields its URL."""
    return api_process(settings, workdir, "management")


@contextmanager
def supervisor_process(
    settings: Settings,
    home: Path,
    host: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """``mqserve supervisor`` for ``host``, stopped (and its workers drained) on exit.

    The host has no GPUs (``CUDA_VISIBLE_DEVICES=""``) unless ``env`` says otherwise;
    ``env`` is laid over this process's environment (e.g. ``CUDA_VISIBLE_DEVICES=0,1``
    to pretend two GPUs, or a ``PATH`` with a fake ``nvidia-smi``). Yields once the
    supervisor has announced itself in Redis, failing after ``timeout`` seconds. On
    exit, also when that check or the test fails: SIGTERM (it drains its workers), 60 s,
    then SIGKILL; then the workers recorded under ``home`` that still run are killed
    (workers outlive a supervisor that was killed, as a successor would adopt them).
    """
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / f"supervisor-{host}.log"
    env = {**os.environ, "MQSERVE_HOME": str(home), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    argv = [sys.executable, "-m", "control.cli", "supervisor",
            "--redis-url", str(settings.redis_url), "--model-store", str(settings.model_store),
            "--host-name", host]  # fmt: skip
    with contextlib.ExitStack() as stack:
        # Registered first, so it runs last: after the supervisor has stopped.
        stack.callback(kill_leftover_workers, home)
        proc = stack.enter_context(started(argv, log=log_path, env=env, grace=60))
        client = stack.enter_context(redis.Redis.from_url(str(settings.redis_url)))
        wait_for(
            lambda: client.exists(keys.host(host)) or proc.poll() is not None,
            timeout,
            f"supervisor {host}",
        )
        assert proc.poll() is None, log_path.read_text()
        yield proc


def kill_leftover_workers(home: Path) -> list[int]:
    """SIGKILL the model workers recorded under ``home``'s ``run/workers`` that still
    run, wait (10 s at most) until they have exited, forget their pid files; their pids."""
    pids = Home.at(home).live_workers()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 10, f"worker {pid} to exit")
    Home.at(home).forget_workers()
    return pids


def kill_recorded(home: Path) -> list[int]:
    """SIGKILL every process that ``home``'s pid files record and that still runs (a
    stack's launcher and children in ``run/*.pid``, its model workers in
    ``run/workers``) and everything below them; wait (10 s at most) until all have
    exited; their pids.

    The safety net a stack's cleanup runs after ``mqserve stop``: a stop that failed,
    hung or was never reached (the start failed half-way) leaves nothing behind.
    """
    recorded = Home.at(home)
    pids = [live_pid(path) for path in sorted(recorded.run_dir.glob("*.pid"))]
    procs: list[psutil.Process] = []
    for pid in [*(pid for pid in pids if pid is not None), *recorded.live_workers()]:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
            procs.extend(_below(pid))
    for proc in procs:  # psutil checks the start time: a reused pid is not touched
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)
    recorded.forget_workers()
    return [proc.pid for proc in procs]


class RestartableRedis:
    """A redis-server on a fixed loopback port that a test can stop and start again.

    Append-only persistence (fsync on every write) keeps the registry across restarts,
    as an external Redis in production would; :meth:`stop` is SIGTERM, a clean shutdown.
    """

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise AssertionError("redis-server is required: apt-get install -y redis-server")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._args = [
            exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(workdir),
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers.

        If it does not answer within 10 s it is stopped again before the error.
        """
        self._proc = subprocess.Popen(
            self._args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: pings(self.url), 10, "redis-server")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (SIGTERM; SIGKILL after 10 s) and wait until its port is closed."""
        if self._proc is not None:
            stop_process(self._proc, grace=10)
        wait_for(lambda: not port_open(self.port), 10, "redis-server to close its port")


@contextmanager
def restartable_redis(workdir: Path) -> Iterator[RestartableRedis]:
    """A started :class:`RestartableRedis`, stopped on exit (a failed start included)."""
    server = RestartableRedis(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
