"""Real processes for the integration and acceptance tiers: redis-server, gunicorn apps."""

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

import redis

from control.core import keys
from control.core.home import Home, alive
from control.core.settings import Settings
from control.http.gunicorn_worker import LIMIT_ARGS, WORKER_CLASS


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


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private redis-server on a free loopback port; yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise AssertionError("redis-server is required: apt-get install -y redis-server")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: redis.Redis.from_url(url).ping(), 10, "redis-server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def api_process(settings: Settings, workdir: Path, app: str = "management") -> Iterator[str]:
    """One API app under gunicorn, exactly as the launcher runs it; yields its URL.

    ``app`` is ``management``, ``inference`` or ``metrics``.
    """
    port = free_port()
    settings = settings.replace(**{f"{app}_address": f"http://127.0.0.1:{port}"})
    workdir.mkdir(parents=True, exist_ok=True)
    settings_file = workdir / f"settings-{port}.json"
    settings_file.write_text(settings.to_json())
    log_path = workdir / f"gunicorn-{app}-{port}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            f"control.server:{app}_app()",
            "--bind",
            f"127.0.0.1:{port}",
            "-k",
            WORKER_CLASS,
            *LIMIT_ARGS,
            "--workers",
            "1",
            "--threads",
            "16",
            "--no-control-socket",
        ],
        env={**os.environ, "MQSERVE_SETTINGS": str(settings_file)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 30, "gunicorn")
        assert proc.poll() is None, log_path.read_text()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def management_process(settings: Settings, workdir: Path) -> AbstractContextManager[str]:
    """The management app under gunicorn; yields its URL."""
    return api_process(settings, workdir, "management")


@contextmanager
def supervisor_process(
    settings: Settings, home: Path, host: str, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``mqserve supervisor`` for ``host``, stopped (and its workers drained) on exit.

    The host has no GPUs (``CUDA_VISIBLE_DEVICES=""``) unless ``env`` says otherwise;
    ``env`` is laid over this process's environment (e.g. ``CUDA_VISIBLE_DEVICES=0,1``
    to pretend two GPUs, or a ``PATH`` with a fake ``nvidia-smi``).
    """
    home.mkdir(parents=True, exist_ok=True)
    log = (home / f"supervisor-{host}.log").open("wb")
    env = {**os.environ, "MQSERVE_HOME": str(home), "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control.cli",
            "supervisor",
            "--redis-url",
            str(settings.redis_url),
            "--model-store",
            str(settings.model_store),
            "--host-name",
            host,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis.from_url(str(settings.redis_url))
    try:
        wait_for(
            lambda: client.exists(keys.host(host)) or proc.poll() is not None,
            60,
            f"supervisor {host}",
        )
        assert proc.poll() is None, (home / f"supervisor-{host}.log").read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        log.close()
        # Workers outlive a supervisor that was killed (a successor would adopt them):
        # the test is over, so whatever it left goes.
        kill_leftover_workers(home)


def kill_leftover_workers(home: Path) -> list[int]:
    """SIGKILL the model workers recorded under ``home``'s ``run/workers``; their pids."""
    pids = Home.at(home).live_workers()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 10, f"worker {pid} to exit")
    Home.at(home).forget_workers()
    return pids


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
        """Start the server (again, on the same port) and wait until it answers."""
        self._proc = subprocess.Popen(
            self._args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait_for(lambda: redis.Redis.from_url(self.url).ping(), 10, "redis-server")

    def stop(self) -> None:
        """Stop the server and wait until its port is closed."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)
        wait_for(lambda: not port_open(self.port), 10, "redis-server to close its port")


@contextmanager
def restartable_redis(workdir: Path) -> Iterator[RestartableRedis]:
    """A started :class:`RestartableRedis`, stopped on exit."""
    server = RestartableRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
