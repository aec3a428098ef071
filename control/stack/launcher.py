"""``mqserve start|stop|status``: run a :class:`~control.stack.children.Stack` and find it again.

:func:`run` is the foreground runner: it starts the stack (Redis, the keys, the API
servers, the supervisor), registers the startup models, writes ``run/ready`` (layout in
:mod:`control.core.home`), restarts a child that exits unexpectedly (with back-off,
:mod:`control.stack.restart`), and stops the children on SIGTERM/SIGINT or once one of them
crash-loops (the reason goes to ``run/stopped`` and the log). :func:`start` runs it in
the foreground or detached.

:func:`status` and :func:`stop` read the pid files, so they tell and stop the truth
even after the runner was killed: :func:`stop` returns within ``stop_grace`` + 60 s,
whatever the workers are doing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TypeVar

import redis

from control.core import home as homes
from control.core.devices import default_startup_workers
from control.core.errors import ConflictStatusException, ModelServerError
from control.core.home import Home
from control.core.settings import Settings
from control.http.params import Params
from control.server import management_service
from control.stack.children import (
    API_PORTS,
    REDIS_STOP_TIMEOUT_S,
    SUPERVISOR_STOP_MARGIN_S,
    Interrupted,
    LaunchError,
    Stack,
    answers_http,
    grpc_answers,
)

__all__ = [
    "LaunchError",
    "Stack",
    "expand_load_models",
    "load_models",
    "run",
    "start",
    "status",
    "stop",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a detached ``mqserve start`` waits for ``run/ready``.
READY_TIMEOUT_S = 300.0
ARCHIVE_SUFFIXES = (".mar", ".tar.gz", ".tgz")
_NAMED_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)=(.+)$")


# -- startup models ------------------------------------------------------------------------


def expand_load_models(
    entries: tuple[str, ...], store: Path | None
) -> list[tuple[str | None, str]]:
    """TorchServe's ``load_models`` forms as ``(name or None, url)`` pairs.

    ``all`` is every non-hidden ``.mar``/``.tar.gz``/``.tgz`` file and every directory of
    the model store, sorted; ``name=url`` names the model; anything else is a url.
    """
    out: list[tuple[str | None, str]] = []
    for entry in entries:
        if entry == "all":
            if store is None:
                raise LaunchError("load_models=all needs a model store (--model-store)")
            for path in sorted(store.iterdir()):
                if not path.name.startswith(".") and (
                    path.is_dir() or path.name.endswith(ARCHIVE_SUFFIXES)
                ):
                    out.append((None, path.name))
            continue
        match = _NAMED_ENTRY.match(entry)
        out.append((match.group(1), match.group(2)) if match else (None, entry))
    return out


def load_models(settings: Settings, client: redis.Redis) -> None:
    """Register the startup models; failures are logged, never fatal (as in TorchServe)."""
    entries = expand_load_models(settings.load_models, settings.model_store)
    if not entries:
        return
    service = management_service(settings, client)
    workers = default_startup_workers(settings.default_workers_per_model)
    for name, url in entries:
        params = Params(
            {
                "url": url,
                "model_name": name,
                "initial_workers": workers,
                "synchronous": False,
            }
        )
        try:
            _, message = service.register(params, loaded_at_startup=True)
        except ConflictStatusException as exc:  # the registry outlives restarts
            log.info("startup model %s already registered, skipped: %s", url, exc.message)
        except ModelServerError as exc:
            log.error("startup model %s failed to register: %s", url, exc.message)
        except Exception:
            log.exception("startup model %s failed to register", url)
        else:
            log.info("startup model %s: %s", url, message)


# -- entry points ------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_signals(handler: Callable[[], None]) -> Iterator[None]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        handler()  # only sets an Event: logging here could interleave with the main thread

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _refuse_if_running(home: Home) -> None:
    pid = homes.live_pid(home.pid_file)
    if pid is not None:
        raise LaunchError(f"mqserve is already running (pid {pid}); run `mqserve stop` first")
    for name, leftover in home.children():  # two Redis servers on one data dir corrupt it
        raise LaunchError(
            f"a {name} process (pid {leftover}) of an earlier run is still alive; "
            "run `mqserve stop` first"
        )


def run(settings: Settings, with_supervisor: bool = True) -> int:
    """Run a stack in the foreground until SIGTERM/SIGINT (0) or a child dies (1).

    Raises :class:`LaunchError` when the stack cannot start; whatever had started is
    stopped first. ``with_supervisor=False`` runs the API ports only (``mqserve api``).
    """
    stack = Stack(settings, after_start=load_models, with_supervisor=with_supervisor)
    stack.home.make()
    with _exclusive(stack.home), _stop_signals(stack.request_stop):
        _refuse_if_running(stack.home)
        stack.home.stopped_file.unlink(missing_ok=True)
        homes.write_pid(stack.home.pid_file, os.getpid())
        try:  # the signal handlers stay in place so that a second ^C cannot cut the stop short
            try:
                stack.start()
            except Interrupted:
                log.info("stop requested during startup")
                return 0
            log.info("mqserve is ready (home %s)", stack.home.root)
            code = stack.watch()
            if stack.failure is not None:  # for `mqserve status`, which outlives this run
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                log_path = stack.home.log_of(homes.RUNNER)
                homes.write_private(
                    stack.home.stopped_file, f"{stamp}: {stack.failure}; see {log_path}\n"
                )
            return code
        finally:
            stack.stop()
            stack.home.pid_file.unlink(missing_ok=True)
            log.info("mqserve stopped")


@contextlib.contextmanager
def _exclusive(home: Home) -> Iterator[None]:
    """Hold ``run/mqserve.lock`` while running, so two racing starts cannot both win."""
    with (home.run_dir / "mqserve.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LaunchError(
                "mqserve is already starting or running; run `mqserve stop` first"
            ) from None
        yield


def start(settings: Settings, foreground: bool) -> int:
    """``mqserve start``: :func:`run` here, or detached, returning once ``run/ready`` exists."""
    home = Home.at(settings.home)
    _refuse_if_running(home)
    if foreground:
        return run(settings)
    home.make()
    home.ready_file.unlink(missing_ok=True)
    launch = home.run_dir / "launch.json"
    homes.write_private(launch, settings.replace(home=home.root).to_json())
    argv = [sys.executable, "-m", "control.cli", "start", "--foreground", "--settings-file"]
    logfile = home.log_of("mqserve")
    with logfile.open("ab") as out:
        offset = out.tell()  # this run's lines only, not earlier runs'
        proc = subprocess.Popen(
            [*argv, str(launch)], stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not home.ready_file.exists():
        if proc.poll() is not None:
            lines = homes.tail(logfile, since=offset)
            raise LaunchError(f"mqserve failed to start; last lines of {logfile}:\n{lines}")
        if time.monotonic() > deadline:
            raise LaunchError(f"mqserve (pid {proc.pid}) is not ready yet; see {logfile}")
        time.sleep(homes.POLL_S)
    print(f"mqserve started (pid {proc.pid}); logs in {logfile.parent}")
    return 0


def stop(home_dir: Path) -> int:
    """``mqserve stop``: stop the runner and every child recorded in ``run/*.pid``.

    With a live runner: SIGTERM, and SIGKILL if it has not stopped its children within
    :func:`stop_budget`. Then (and when the runner was already gone) every recorded
    child still alive gets SIGTERM, ``stop_grace`` + 10 s, and SIGKILL with whatever
    was below it; Redis last, with 30 s of its own. Either way this takes at most
    ``stop_grace`` + 60 s while the children obey SIGKILL (a runner that hung would add
    its :func:`stop_budget`). Returns 1 (after printing "mqserve is not running") when
    there was nothing to stop.
    """
    home = Home.at(home_dir)
    settings = _recorded_settings(home)
    pid = homes.live_pid(home.pid_file)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        if not homes.wait_gone(pid, stop_budget(settings)):
            print(f"mqserve (pid {pid}) did not stop in time; killing it", file=sys.stderr)
            homes.signal_group(pid, signal.SIGKILL)
            homes.wait_gone(pid, 10.0)
    grace = settings.stop_grace + SUPERVISOR_STOP_MARGIN_S
    leftovers = home.stop_children(grace, ("redis",), REDIS_STOP_TIMEOUT_S)
    for path in (home.pid_file, home.ready_file, home.key_file):
        path.unlink(missing_ok=True)
    if pid is None and not leftovers:
        print("mqserve is not running", file=sys.stderr)
        return 1
    if pid is not None:
        print("mqserve stopped")
    else:
        named = ", ".join(f"{name} (pid {child})" for name, child in _in_order(leftovers))
        print(f"stopped what the launcher left: {named}")
    return 0


def _in_order(items: Sequence[tuple[str, T]]) -> list[tuple[str, T]]:
    """``(name, ...)`` pairs in :data:`CHILD_ORDER`; unknown names last, by name."""
    rank = {name: i for i, name in enumerate(CHILD_ORDER)}
    return sorted(items, key=lambda item: (rank.get(item[0], len(rank)), item[0]))


def _recorded_settings(home: Home) -> Settings:
    try:
        return Settings.from_json(home.settings_file.read_text())
    except (OSError, ValueError):
        return Settings()


def stop_budget(settings: Settings) -> float:
    """Seconds a runner may take to stop: the children's bound, then Redis's, plus margin."""
    return settings.stop_grace + SUPERVISOR_STOP_MARGIN_S + REDIS_STOP_TIMEOUT_S + 15


def api_answers(settings: Settings) -> list[str]:
    """The API ports (of :data:`API_PORTS`) that do not answer HTTP, then the gRPC
    services that do not answer gRPC; empty when healthy."""
    down = [which for which in API_PORTS if not answers_http(*settings.bind(which))]
    return down + grpc_answers(settings)


#: The order ``mqserve status`` names the children in (their start order).
CHILD_ORDER = ("redis", *API_PORTS, "grpc", "supervisor")


def status(home_dir: Path) -> tuple[str, bool]:
    """What runs in ``home_dir``, in words, and whether the stack is healthy.

    Healthy: the runner is alive, ready, and every child it recorded is alive. The
    words are ``running (pid N)`` then; otherwise they name what is alive and what
    is not, from the pid files, even when the runner is gone, and after a stack that
    stopped itself, why (``run/stopped``).
    """
    home = Home.at(home_dir)
    pid = homes.live_pid(home.pid_file)
    recorded = _in_order(home.recorded())
    alive = ", ".join(name for name, child in recorded if child is not None)
    dead = ", ".join(name for name, child in recorded if child is None)
    try:
        stopped = home.stopped_file.read_text().strip()
    except OSError:
        stopped = ""
    if pid is not None:
        if stopped:
            return f"stopping (pid {pid}; {stopped})", False
        if not home.ready_file.exists():
            return f"starting (pid {pid})", False
        if dead:
            return f"running (pid {pid}; {dead} not running, being restarted)", False
        return f"running (pid {pid})", True
    if alive:
        missing = f"; {dead} not running" if dead else ""
        return f"running (launcher gone; {alive} alive{missing}; run `mqserve stop`)", False
    return "not running" + (f" ({stopped})" if stopped else ""), False
