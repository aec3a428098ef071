"""``MQSERVE_HOME``: the directory layout of one stack and the process records in it.

::

    redis/           Redis data directory (append-only file: the registry survives restarts)
    run/             one pid file per process (mqserve.pid for the launcher, then redis.pid,
                     management.pid, inference.pid, metrics.pid, supervisor.pid), settings.json,
                     ready, stopped (why the stack last stopped by itself), the socket redis.sock
    run/workers/     <wid>.pid of every live model worker, written and removed by the worker
                     itself: workers outlive a supervisor that crashed (its successor adopts
                     them), so a stop finds them here, not below the supervisor
    logs/            one log per process: mqserve.log, redis.log, management.log, ...
    models/          archives unpacked for this stack's workers: <host>/<model>/<version>/
                     (workers.model_files.ModelFiles; mode 0700, removed with the last worker)
    key_file.json    the operator's API keys (deleted on stop, as TorchServe does)

A pid file holds the pid and the process start time, so that a pid reused by an
unrelated process after a crash is never taken for ours (and never signalled). The
launcher rewrites a child's pid file when it restarts it and removes it once the child
is stopped, so the files are the truth about what runs even after the launcher died:
``mqserve status`` reads them, and ``mqserve stop`` stops what they name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_S = 0.05
RUNNER = "mqserve"


@dataclass(frozen=True)
class Home:
    """The layout of one ``MQSERVE_HOME``; ``root`` is absolute."""

    root: Path

    @classmethod
    def at(cls, path: Path) -> Home:
        """The home at ``path``, made absolute (children may run elsewhere)."""
        return cls(path.expanduser().absolute())

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "redis.sock"

    @property
    def settings_file(self) -> Path:
        return self.run_dir / "settings.json"

    @property
    def pid_file(self) -> Path:
        """The runner's pid file: ``run/mqserve.pid``."""
        return self.pid_of(RUNNER)

    @property
    def ready_file(self) -> Path:
        """Exists once the runner has started everything and loaded the startup models."""
        return self.run_dir / "ready"

    @property
    def stopped_file(self) -> Path:
        """Why the launcher last stopped the stack by itself (a child crash-looped)."""
        return self.run_dir / "stopped"

    @property
    def key_file(self) -> Path:
        """The operator's API keys (``Settings.key_file`` is this file of its home)."""
        return self.root / "key_file.json"

    @property
    def models_dir(self) -> Path:
        """Where this stack's workers unpack archives (no other stack's workers look here)."""
        return self.root / "models"

    def pid_of(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    @property
    def workers_dir(self) -> Path:
        """``run/workers``: one pid file per live model worker."""
        return self.run_dir / "workers"

    def worker_pid_of(self, wid: str) -> Path:
        return self.workers_dir / f"{wid}.pid"

    def live_workers(self) -> list[int]:
        """Pids of the model workers recorded in ``run/workers`` that still run."""
        pids = (live_pid(path) for path in sorted(self.workers_dir.glob("*.pid")))
        return [pid for pid in pids if pid is not None]

    def forget_workers(self) -> None:
        """Remove the worker pid files whose process is gone (after a stop)."""
        for path in self.workers_dir.glob("*.pid"):
            if live_pid(path) is None:
                path.unlink(missing_ok=True)

    def log_of(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def make(self) -> None:
        """Create the directories, private to the user (the socket and keys live here)."""
        for path in (self.root, self.redis_dir, self.run_dir, self.root / "logs"):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def recorded(self) -> list[tuple[str, int | None]]:
        """Every child recorded in ``run/*.pid`` but the runner: ``(name, live pid or None)``."""
        return [
            (path.stem, live_pid(path))
            for path in sorted(self.run_dir.glob("*.pid"))
            if path.stem != RUNNER
        ]

    def children(self) -> list[tuple[str, int]]:
        """Live processes recorded in ``run/*.pid`` other than the runner: ``(name, pid)``."""
        return [(name, pid) for name, pid in self.recorded() if pid is not None]

    def stop_children(
        self, grace: float, last: Sequence[str] = (), last_grace: float = 30.0
    ) -> list[tuple[str, int]]:
        """Stop the recorded children a dead runner left behind, then forget them.

        Every child but those named in ``last`` is sent SIGTERM at once and given
        ``grace`` seconds; then the ones in ``last`` (Redis, which the others need while
        they drain) get ``last_grace`` seconds. Whatever still runs after its
        grace, and every process that was below a child when the stop began (its
        workers), is SIGKILLed, so nothing recorded is left running. Model workers
        recorded in ``run/workers`` (those a dead supervisor left, which are below no
        child) are in the first group. Returns the ``(name, pid)`` of each child that
        was alive.
        """
        alive_now = self.children()
        first = [pid for name, pid in alive_now if name not in last] + self.live_workers()
        then = [pid for name, pid in alive_now if name in last]
        for group, seconds in ((first, grace), (then, last_grace)):
            if group:
                terminate(group, seconds)
        for path in self.run_dir.glob("*.pid"):
            if path.stem != RUNNER:
                path.unlink(missing_ok=True)
        self.forget_workers()
        return alive_now


def write_private(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path`` with mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_pid(path: Path, pid: int) -> None:
    """Record ``pid`` and its start time."""
    write_private(path, f"{pid}\n{psutil.Process(pid).create_time()!r}\n")


def live_pid(path: Path) -> int | None:
    """The pid recorded in ``path`` if that very process is still alive, else None."""
    try:
        pid_text, _, started = path.read_text().partition("\n")
        pid = int(pid_text)
        proc = psutil.Process(pid)
        if started.strip() and abs(proc.create_time() - float(started)) > 0.01:
            return None
        return None if proc.status() == psutil.STATUS_ZOMBIE else pid
    except (OSError, ValueError, psutil.Error):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    """Poll until ``pid`` is gone; False if it still runs after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def descendants(pid: int) -> list[psutil.Process]:
    """The processes below ``pid`` now (empty when it is gone)."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def terminate(pids: Sequence[int], grace: float) -> None:
    """SIGTERM each process group led by ``pids``; SIGKILL what remains after ``grace`` s.

    What remains includes every descendant seen before the SIGTERM, even one in a
    session of its own (a model worker): a stop leaves nothing of these processes.
    """
    below = [proc for pid in pids for proc in descendants(pid)]
    for pid in pids:
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        if not wait_gone(pid, max(deadline - time.monotonic(), 0.0)):
            signal_group(pid, signal.SIGKILL)
            wait_gone(pid, 10.0)
    for proc in below:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
    psutil.wait_procs(below, timeout=10.0)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid``, or ``pid`` alone if it leads none.

    Never the caller's own group: a foreground runner shares its shell's job group.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid and pid != os.getpgrp():
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def tail(path: Path, lines: int = 20, since: int = 0) -> str:
    """The last ``lines`` lines of a log file after byte offset ``since``."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
