"""``MQSERVE_HOME``: the directory layout of one stack and the process records in it.

::

    redis/           Redis data directory (append-only file: the registry survives restarts)
    run/             pid files, settings.json, ready, and the Redis unix socket redis.sock
    logs/            one log per process: mqserve.log, redis.log, management.log, ...
    models/          archives unpacked for this stack's workers: <host>/<model>/<version>/
                     (workers.launch.ModelFiles; mode 0700, removed with the last worker)
    key_file.json    the operator's API keys (deleted on stop, as TorchServe does)

A pid file holds the pid and the process start time, so that a pid reused by an
unrelated process after a crash is never taken for ours (and never signalled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
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
    def key_file(self) -> Path:
        return self.root / "key_file.json"

    @property
    def models_dir(self) -> Path:
        """Where this stack's workers unpack archives (no other stack's workers look here)."""
        return self.root / "models"

    def pid_of(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_of(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def make(self) -> None:
        """Create the directories, private to the user (the socket and keys live here)."""
        for path in (self.root, self.redis_dir, self.run_dir, self.root / "logs"):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def children(self) -> list[tuple[str, int]]:
        """Live processes recorded in ``run/*.pid`` other than the runner: ``(name, pid)``."""
        found = []
        for path in sorted(self.run_dir.glob("*.pid")):
            pid = live_pid(path)
            if path.stem != RUNNER and pid is not None:
                found.append((path.stem, pid))
        return found

    def kill_children(self) -> list[str]:
        """SIGKILL the children a dead runner left behind and forget them; their names."""
        killed = []
        for name, pid in self.children():
            signal_group(pid, signal.SIGKILL)
            wait_gone(pid, 10.0)
            killed.append(f"{name} (pid {pid})")
        for path in self.run_dir.glob("*.pid"):
            if path.stem != RUNNER:
                path.unlink(missing_ok=True)
        return killed


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
