"""The processes of one mqserve stack: how each starts, when it is up, how it stops.

A :class:`Child` is one process: its argv, a readiness probe, and its start and stop
deadlines. :func:`api_children` lists the processes started after Redis, in order;
adding a process to every stack is one entry there. :class:`Stack` starts them one
after the other, each in a session of its own (a terminal's ^C reaches only the
runner, which decides the order of shutdown), watches them, and stops them in
reverse order.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from control import keys
from control.auth import KeyStore
from control.home import POLL_S, Home, signal_group, tail, write_pid, write_private
from control.redis_io import redis_client
from control.server import SETTINGS_ENV
from control.settings import Settings

log = logging.getLogger(__name__)

#: Longest path the kernel accepts for a unix socket (``sun_path`` less its NUL).
SOCKET_PATH_MAX = 107
REDIS_START_TIMEOUT_S = 30.0
REDIS_STOP_TIMEOUT_S = 30.0
API_START_TIMEOUT_S = 60.0

#: Work done once every child is up, before the stack counts as ready.
AfterStart = Callable[[Settings, redis.Redis], None]


class LaunchError(RuntimeError):
    """The stack cannot start or stop; the message is meant for the operator."""


class Interrupted(Exception):
    """A stop was requested while the stack was still starting."""


# -- probes ------------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def pings(client_factory: Callable[[], redis.Redis]) -> bool:
    """True when a fresh client answers PING (a loading Redis does not, yet)."""
    client = client_factory()
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def answers_http(host: str, port: int) -> bool:
    """True when ``host:port`` answers an HTTP request, whatever the status.

    Stronger than a TCP connect: gunicorn listens before its workers have imported the
    app, and a worker that cannot load it would make the stack "ready" but deaf.
    Wildcard addresses are probed on loopback.
    """
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 (probe only)
    conn = http.client.HTTPConnection(wildcard.get(host, host), port, timeout=2.0)
    try:
        conn.request("GET", "/ping")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def ensure_free(host: str, port: int, what: str) -> None:
    """Fail early and clearly when another process already listens on ``host:port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise LaunchError(f"{what} {host}:{port} {reason}") from exc


# -- children ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    """One process of the stack: how to start it and how to tell it is up."""

    name: str
    argv: tuple[str, ...]
    ready: Callable[[], bool]
    env: Mapping[str, str] | None = None
    start_timeout: float = API_START_TIMEOUT_S
    #: Seconds between SIGTERM and SIGKILL when stopping.
    stop_timeout: float = 30.0


@dataclass
class Running:
    child: Child
    proc: subprocess.Popen[bytes]
    log: Path
    #: Where this run's output starts in the (appended) log.
    log_start: int

    def log_tail(self) -> str:
        return f"last lines of {self.log}:\n{tail(self.log, since=self.log_start)}"


def redis_child(home: Home) -> Child:
    """The private ``redis-server``: unix socket only, AOF persistence, never evicting."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError("redis-server not found on PATH: install Redis 7 or pass --redis-url")
    sock = home.socket
    if len(os.fsencode(sock)) > SOCKET_PATH_MAX:
        raise LaunchError(
            f"MQSERVE_HOME {home.root} is too long for the Redis unix socket ({sock} exceeds "
            f"{SOCKET_PATH_MAX} bytes); set MQSERVE_HOME to a shorter path"
        )
    argv = (
        binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
        "--dir", str(home.redis_dir), "--appendonly", "yes", "--appendfsync", "everysec",
        "--save", "", "--protected-mode", "yes", "--maxmemory-policy", "noeviction",
        # 100 timer ticks a second: blocking timeouts (the batching window) end within
        # 10 ms of when they should, instead of 100 ms.
        "--hz", "100", "--daemonize", "no",
    )  # fmt: skip

    def ready() -> bool:
        return pings(lambda: redis.Redis(unix_socket_path=str(sock), socket_timeout=1))

    return Child("redis", argv, ready, None, REDIS_START_TIMEOUT_S, REDIS_STOP_TIMEOUT_S)


def api_child(settings: Settings, home: Home, which: str) -> Child:
    """gunicorn serving one API (``management``, ``inference`` or ``metrics``).

    gthread workers: a synchronous register or a prediction waits on Redis for as long
    as it takes, and gthread's timeout only checks that the worker process lives.
    """
    host, port = settings.bind(which)
    ensure_free(host, port, f"{which}_address")
    graceful = settings.unregister_model_timeout + 10
    # Metrics are scraped rarely: one process's threads serve them and save ~45 MiB.
    # Inference and management (describe is a hot read for some clients) use several.
    processes = 1 if which == "metrics" else settings.api_processes
    argv = (
        sys.executable, "-m", "gunicorn", f"control.server:{which}_app()",
        "--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "-k", "gthread", "--workers", str(processes),
        "--threads", str(settings.api_threads), "--no-control-socket",
        "--graceful-timeout", str(graceful), "--timeout", "30", "--access-logfile", "-",
    )  # fmt: skip
    env = {**os.environ, SETTINGS_ENV: str(home.settings_file)}
    return Child(which, argv, lambda: answers_http(host, port), env, stop_timeout=graceful + 5)


def supervisor_child(settings: Settings, home: Home) -> Child:
    """This host's worker supervisor; ready once it has announced itself in Redis."""
    host = socket.gethostname()
    argv = (
        sys.executable, "-m", "control.cli", "supervisor",
        "--settings-file", str(home.settings_file), "--host-name", host,
    )  # fmt: skip

    def ready() -> bool:
        url = settings.redis_url
        if url is None:
            return False
        client = redis_client(url)
        try:
            return bool(client.exists(keys.host(host)))
        except redis.RedisError:
            return False
        finally:
            client.close()

    # Stopping drains the workers: each may finish a request of up to response_timeout.
    return Child("supervisor", argv, ready, None, stop_timeout=180.0)


API_PORTS = ("management", "inference", "metrics")


def api_children(settings: Settings, home: Home, with_supervisor: bool = True) -> list[Child]:
    """The processes started once Redis is up and the keys are issued, in start order.

    ``with_supervisor=False`` is ``mqserve api``: the API ports only, as the compose
    stack's ``api`` service runs them, with the supervisor in a container of its own.
    """
    children = [api_child(settings, home, which) for which in API_PORTS]
    if with_supervisor:
        children.append(supervisor_child(settings, home))
    return children


# -- the stack -------------------------------------------------------------------------------


class Stack:
    """The children of one mqserve home, started in order and stopped in reverse."""

    def __init__(
        self,
        settings: Settings,
        after_start: AfterStart | None = None,
        with_supervisor: bool = True,
    ) -> None:
        self.home = Home.at(settings.home)
        self._with_supervisor = with_supervisor
        self._after_start = after_start
        self.settings = settings.replace(home=self.home.root)
        self._running: list[Running] = []
        self._stop = threading.Event()

    def request_stop(self) -> None:
        """Ask :meth:`start` to abandon startup, or :meth:`watch` to return. Signal-safe."""
        self._stop.set()

    def start(self) -> None:
        """Start every child, then run ``after_start``; write ``run/ready``.

        Raises :class:`LaunchError` when a child fails or times out, and
        :class:`Interrupted` when :meth:`request_stop` came first. Either way the
        children already started keep running until :meth:`stop`.
        """
        self.home.make()
        self.home.ready_file.unlink(missing_ok=True)
        if self.settings.redis_url is None:
            self._launch(redis_child(self.home))
            self.settings = self.settings.replace(redis_url=f"unix://{self.home.socket}")
        url = self.settings.redis_url
        assert url is not None
        if not pings(lambda: redis.Redis.from_url(url, socket_timeout=5)):
            raise LaunchError(f"cannot reach Redis at {redact(url)}")
        client = redis_client(url)
        try:
            self._prepare(client)
            for child in api_children(self.settings, self.home, self._with_supervisor):
                self._launch(child)
            if self._after_start is not None:
                self._after_start(self.settings, client)
        except redis.RedisError as exc:
            raise LaunchError(f"Redis at {redact(url)} failed during startup: {exc}") from exc
        finally:
            client.close()
        self.home.ready_file.write_text(f"{os.getpid()}\n")

    def _prepare(self, client: redis.Redis) -> None:
        write_private(self.home.settings_file, self.settings.to_json())
        if self.settings.token_auth:
            KeyStore(client, self.settings.key_file, self.settings.token_expiration_min).issue_all()
        else:  # keys left by an earlier run would mislead the operator
            self.settings.key_file.unlink(missing_ok=True)

    def _launch(self, child: Child) -> None:
        path = self.home.log_of(child.name)
        with path.open("ab") as out:
            start = out.tell()  # before the child shares (and moves) this offset
            proc = subprocess.Popen(
                child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        running = Running(child, proc, path, start)
        self._running.append(running)
        write_pid(self.home.pid_of(child.name), proc.pid)
        log.info("started %s (pid %d)", child.name, proc.pid)
        deadline = time.monotonic() + child.start_timeout
        while not child.ready():
            self._check_children()
            if self._stop.is_set():
                raise Interrupted
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{child.name} did not become ready within {child.start_timeout:.0f} s; "
                    f"{running.log_tail()}"
                )
            self._stop.wait(POLL_S)

    def _check_children(self) -> None:
        for running in self._running:
            code = running.proc.poll()
            if code is not None:
                raise LaunchError(
                    f"{running.child.name} exited with code {code}; {running.log_tail()}"
                )

    def watch(self) -> int:
        """Block until a stop is requested (0) or a child dies (1)."""
        while not self._stop.wait(0.2):
            try:
                self._check_children()
            except LaunchError as exc:
                log.error("%s\nstopping mqserve", exc)
                return 1
        return 0

    def stop(self) -> None:
        """Stop the children in reverse order: SIGTERM, grace period, SIGKILL."""
        while self._running:
            running = self._running.pop()
            name, proc = running.child.name, running.proc
            if proc.poll() is None:
                signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(running.child.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time; killing it", name)
                    signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.info("stopped %s (exit code %s)", name, proc.returncode)
            self.home.pid_of(name).unlink(missing_ok=True)
        self.home.ready_file.unlink(missing_ok=True)
        self.settings.key_file.unlink(missing_ok=True)
