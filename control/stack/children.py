"""The processes of one mqserve stack: how each starts, when it is up, how it stops.

A :class:`Child` is one process: its argv, a readiness probe, and its start and stop
deadlines. :func:`api_children` lists the processes started after Redis, in order;
adding a process to every stack is one entry there. :class:`Stack` starts them one
after the other, each in a session of its own (a terminal's ^C reaches only the
runner, which decides the order of shutdown), and watches them: a child that exits
unexpectedly is restarted after a back-off (:class:`control.stack.restart.RestartPolicy`),
its exit code or signal and the tail of its log in the runner's log, and a child that
keeps crashing stops the stack. Stopping sends SIGTERM to every child but Redis at
once, gives them ``stop_grace`` (plus a margin) before SIGKILL, then stops Redis.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from control.core import keys
from control.core.home import (
    POLL_S,
    Home,
    tail,
    terminate,
    write_pid,
    write_private,
)
from control.core.redis_io import redis_client
from control.core.settings import Settings
from control.http.asgi_worker import ASGI_WORKER_CLASS, KEEP_ALIVE_S
from control.http.auth import KeyStore
from control.http.gunicorn_worker import LIMIT_ARGS, WORKER_CLASS
from control.server import SETTINGS_ENV
from control.stack.restart import RestartPolicy

log = logging.getLogger(__name__)

#: Longest path the kernel accepts for a unix socket (``sun_path`` less its NUL).
SOCKET_PATH_MAX = 107
REDIS_START_TIMEOUT_S = 30.0
REDIS_STOP_TIMEOUT_S = 30.0
API_START_TIMEOUT_S = 60.0
#: What a stopping supervisor may take beyond ``stop_grace``: SIGKILLing its workers and
#: giving up its leases in Redis.
SUPERVISOR_STOP_MARGIN_S = 10
#: How often :meth:`Stack.watch` looks at its children.
WATCH_S = 0.2

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
    #: Kill what is left of the child's process group when it crashes (gunicorn's
    #: workers, which would keep the port). Not for the supervisor: its model workers
    #: live in sessions of their own and are adopted by the restarted supervisor.
    kill_group_on_exit: bool = True


@dataclass
class Running:
    child: Child
    proc: subprocess.Popen[bytes]
    log: Path
    #: Where this run's output starts in the (appended) log.
    log_start: int
    #: Monotonic times of the child's crashes, for the restart policy.
    crashes: list[float] = field(default_factory=list)
    #: When a crashed child is due to be restarted; None while it runs.
    restart_at: float | None = None

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

    Inference and management run uvicorn's ASGI worker (``control.http.asgi_worker``):
    a prediction or a synchronous register waits on Redis as a coroutine, so waiting and
    slow clients hold no thread. Metrics keeps gthread workers (a WSGI app scraped
    rarely). gunicorn's ``--timeout`` only checks that a worker process lives. The access
    log is off unless ``enable_access_log``; then it goes to ``logs/access_<which>.log``.
    """
    host, port = settings.bind(which)
    ensure_free(host, port, f"{which}_address")
    # In-flight calls (a synchronous register waiting for its workers) get stop_grace
    # seconds once the stack stops; one still waiting then is cut off (its registration
    # stays in the registry).
    graceful = settings.stop_grace
    # Metrics are scraped rarely: one process's threads serve them and save ~45 MiB.
    # Inference and management (describe is a hot read for some clients) use several.
    processes = 1 if which == "metrics" else settings.api_processes
    argv = (
        sys.executable, "-m", "gunicorn", f"control.server:{which}_app()",
        "--bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        # Both answer unparsable or over-long requests in JSON (control.http.limits).
        *worker_args(which, settings.api_threads), "--workers", str(processes),
        "--no-control-socket", "--graceful-timeout", str(graceful), "--timeout", "30",
        *access_log_args(settings, home, which),
    )  # fmt: skip
    env = {**os.environ, SETTINGS_ENV: str(home.settings_file)}
    return Child(which, argv, lambda: answers_http(host, port), env, stop_timeout=graceful + 5)


def worker_args(which: str, threads: int) -> tuple[str, ...]:
    """gunicorn's worker class and its options for one API port: uvicorn's ASGI worker
    for inference and management, gthread with ``threads`` threads for metrics."""
    if which == "metrics":
        return ("-k", WORKER_CLASS, *LIMIT_ARGS, "--threads", str(threads))
    return ("-k", ASGI_WORKER_CLASS, "--keep-alive", str(KEEP_ALIVE_S))


def access_log_args(settings: Settings, home: Home, which: str) -> tuple[str, ...]:
    """``--access-logfile`` when ``enable_access_log`` is set, else nothing (no log)."""
    if not settings.enable_access_log:
        return ()
    return ("--access-logfile", str(home.log_of(f"access_{which}")))


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

    # Stopping drains the workers for stop_grace s, then SIGKILLs them (workers.supervisor.run);
    # the margin covers giving up its leases in Redis.
    return Child(
        "supervisor", argv, ready, None,
        stop_timeout=settings.stop_grace + SUPERVISOR_STOP_MARGIN_S, kill_group_on_exit=False,
    )  # fmt: skip


def grpc_child(settings: Settings, home: Home) -> Child:
    """The gRPC servers (``python -m control.grpc``): inference on ``grpc_inference_port``,
    management on ``grpc_management_port``, in one asyncio process; ready once both answer
    a gRPC ``Ping`` (``control.grpc.probe``). Stopping gives calls in flight ``stop_grace``."""
    for which in GRPC_SERVICES:
        ensure_free(*settings.grpc_bind(which), f"grpc_{which}_address")
    argv = (sys.executable, "-m", "control.grpc")
    env = {**os.environ, SETTINGS_ENV: str(home.settings_file)}
    return Child(
        "grpc", argv, lambda: grpc_answers(settings) == [], env,
        stop_timeout=settings.stop_grace + 5,
    )  # fmt: skip


def grpc_answers(settings: Settings) -> list[str]:
    """The gRPC services (of :data:`GRPC_SERVICES`) that do not answer; empty when up."""
    # Lazily: grpc is loaded by the processes that probe, not by every importer.
    from control.grpc.probe import answers_grpc

    tls = settings.enable_grpc_ssl
    return [
        f"grpc_{which}"
        for which in GRPC_SERVICES
        if not answers_grpc(*settings.grpc_bind(which), tls=tls)
    ]


API_PORTS = ("management", "inference", "metrics")
GRPC_SERVICES = ("inference", "management")


def api_children(settings: Settings, home: Home, with_supervisor: bool = True) -> list[Child]:
    """The processes started once Redis is up and the keys are issued, in start order.

    ``with_supervisor=False`` is ``mqserve api``: the API ports only, as the compose
    stack's ``api`` service runs them, with the supervisor in a container of its own.
    """
    children = [api_child(settings, home, which) for which in API_PORTS]
    children.append(grpc_child(settings, home))
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
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.home = Home.at(settings.home)
        self.policy = policy or RestartPolicy()
        self._clock = clock
        #: Why :meth:`watch` gave up (a child crash-looped); None otherwise.
        self.failure: str | None = None
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

    def _spawn(self, child: Child) -> Running:
        path = self.home.log_of(child.name)
        with path.open("ab") as out:
            start = out.tell()  # before the child shares (and moves) this offset
            proc = subprocess.Popen(
                child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        write_pid(self.home.pid_of(child.name), proc.pid)
        log.info("started %s (pid %d)", child.name, proc.pid)
        return Running(child, proc, path, start)

    def _launch(self, child: Child) -> None:
        running = self._spawn(child)
        self._running.append(running)
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
        """Restart crashed children until a stop is requested (0) or one crash-loops (1).

        A child that exits is restarted after :attr:`policy`'s back-off (its readiness
        is not awaited: a restart that crashes again is just the next crash); the
        ``limit``-th crash within the window sets :attr:`failure` and returns 1.
        """
        while not self._stop.wait(WATCH_S):
            if not self.check(self._clock()):
                return 1
        return 0

    def check(self, now: float) -> bool:
        """One look at every child: note crashes, restart those due; False to give up."""
        for running in self._running:
            if running.restart_at is not None:
                if now >= running.restart_at:
                    self._restart(running)
                continue
            code = running.proc.poll()
            if code is not None and not self._crashed(running, code, now):
                return False
        return True

    def _crashed(self, running: Running, code: int, now: float) -> bool:
        name, reason = running.child.name, exit_reason(code)
        if running.child.kill_group_on_exit:  # leftovers would hold the port or the socket
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(running.proc.pid, signal.SIGKILL)
        running.crashes.append(now)
        delay = self.policy.decide(running.crashes, now)
        if delay is None:
            self.failure = (
                f"{name} crashed {self.policy.describe()} (last: {reason}); mqserve stopped itself"
            )
            log.error("%s; %s", self.failure, running.log_tail())
            return False
        running.restart_at = now + delay
        log.error(
            "%s exited unexpectedly (%s); restarting it in %g s; %s",
            name, reason, delay, running.log_tail(),
        )  # fmt: skip
        return True

    def _restart(self, running: Running) -> None:
        running.restart_at = None
        try:
            fresh = self._spawn(running.child)
        except OSError as exc:  # counts as a crash: the policy decides whether to retry
            log.error("cannot restart %s: %s", running.child.name, exc)
            running.restart_at = self._clock() + self.policy.first_delay
            return
        running.proc, running.log_start = fresh.proc, fresh.log_start

    def stop(self) -> None:
        """Stop every child: all but Redis at once, then Redis (the others need it to drain).

        Each group gets SIGTERM, then its longest ``stop_timeout``, then SIGKILL for
        itself and every process that was below it (model workers included).
        """
        others = [r for r in self._running if r.child.name != "redis"]
        last = [r for r in self._running if r.child.name == "redis"]
        for group in (others, last):
            live = [r for r in group if r.proc.poll() is None]
            # Workers a crashed supervisor left (adopted by its successor or not) are
            # below no child: they are stopped with the first group, from their pid files.
            orphans = self.home.live_workers() if group is others else []
            if live or orphans:
                grace = float(self.settings.stop_grace)
                timeout = max((r.child.stop_timeout for r in group), default=grace)
                terminate([r.proc.pid for r in live] + orphans, timeout)
            for running in group:
                running.proc.wait()
                log.info(
                    "stopped %s (%s)", running.child.name, exit_reason(running.proc.returncode)
                )
                self.home.pid_of(running.child.name).unlink(missing_ok=True)
        self._running.clear()
        self.home.forget_workers()
        self.home.ready_file.unlink(missing_ok=True)
        self.settings.key_file.unlink(missing_ok=True)


def exit_reason(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL``, from a ``Popen.returncode``."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"
