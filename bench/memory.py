"""Resident memory of a server process and all its descendants, grouped by role.

Give the process at the top of the server's tree:

* mqserve: the runner, whose pid is the first token (line) of
  ``$MQSERVE_HOME/run/mqserve.pid``; the second line is its start time
  (``--server-pid $(head -n1 $MQSERVE_HOME/run/mqserve.pid)``). Below it are
  redis-server, one gunicorn master per API with its workers, and the supervisor, whose
  children are the model workers (forked from it, or started as
  ``python -m workers.worker.process``).
* TorchServe: the java process's pid (``pgrep -f org.pytorch.serve.ModelServer``), not
  the ``torchserve`` launcher's; its children are the Python model workers.

Only :func:`snapshot` needs ``psutil`` (imported when called); the grouping and role
names (:func:`classify`, :func:`group`) are pure functions over :class:`ProcessInfo`.
RSS counts pages shared with other processes (a worker forked from the supervisor shares
much of its memory with it) in every process; PSS, where readable, splits shared pages
between their users, so the PSS column adds up to what the tree really occupies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bench.client import BenchError

MIB = 1024.0 * 1024.0
#: Roles of the processes that run a model (one each per worker).
WORKER_ROLES = ("worker", "python worker")
_GUNICORN_APP = re.compile(r"control\.server:(\w+)_app")


@dataclass(frozen=True)
class ProcessInfo:
    """One process as :func:`snapshot` saw it (bytes)."""

    pid: int
    ppid: int
    name: str
    cmdline: tuple[str, ...]
    rss: int
    pss: int | None = None


@dataclass(frozen=True)
class RoleMemory:
    """The processes of one role: how many, and their summed memory in MiB."""

    role: str
    processes: int
    rss_mib: float
    pss_mib: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "processes": self.processes,
            "rss_mib": self.rss_mib,
            "pss_mib": self.pss_mib,
        }


def _role(info: ProcessInfo, parent_role: str | None, is_root: bool) -> str:
    command = " ".join(info.cmdline)
    if "redis-server" in info.name or "redis-server" in command:
        return "redis-server"
    if parent_role in WORKER_ROLES or parent_role == "worker child":
        return "worker child"
    if "gunicorn" in command:
        app = _GUNICORN_APP.search(command)
        which = f" ({app.group(1)})" if app else ""
        parent_is_master = parent_role is not None and parent_role.startswith("gunicorn master")
        return f"gunicorn {'worker' if parent_is_master else 'master'}{which}"
    if "workers.worker.process" in command or parent_role == "supervisor":
        return "worker"
    if "supervisor" in info.cmdline and "control.cli" in command:
        return "supervisor"
    if info.name == "java" or "org.pytorch.serve.ModelServer" in command:
        return "java"
    if "model_service_worker" in command:
        return "python worker"
    if is_root and ("mqserve" in command or "control.cli" in command):
        return "mqserve runner"
    return info.name or "?"


def classify(processes: Iterable[ProcessInfo], root: int) -> dict[int, str]:
    """A short role for each pid of the tree under ``root`` (see the module docstring).

    Roles depend on the parent's: a gunicorn process under a gunicorn master is one of
    its workers, and a child of the mqserve supervisor is a model worker even though a
    forked worker keeps the supervisor's command line.
    """
    by_pid = {info.pid: info for info in processes}
    children: dict[int, list[int]] = {}
    for info in by_pid.values():
        if info.pid != root:
            children.setdefault(info.ppid, []).append(info.pid)
    roles: dict[int, str] = {}
    todo: list[tuple[int, str | None]] = [(root, None)] if root in by_pid else []
    while todo:
        pid, parent_role = todo.pop()
        roles[pid] = _role(by_pid[pid], parent_role, pid == root)
        todo.extend((child, roles[pid]) for child in sorted(children.get(pid, ())))
    for pid in by_pid:  # a parent that vanished between listings: judge it on its own
        roles.setdefault(pid, _role(by_pid[pid], None, False))
    return roles


def group(processes: Iterable[ProcessInfo], root: int) -> list[RoleMemory]:
    """Memory summed per role, in the order each role first appears by pid."""
    infos = sorted(processes, key=lambda info: info.pid)
    roles = classify(infos, root)
    totals: dict[str, list[ProcessInfo]] = {}
    for info in infos:
        totals.setdefault(roles[info.pid], []).append(info)
    out = []
    for role, members in totals.items():
        pss = [m.pss for m in members]
        out.append(
            RoleMemory(
                role=role,
                processes=len(members),
                rss_mib=sum(m.rss for m in members) / MIB,
                pss_mib=None if None in pss else sum(p or 0 for p in pss) / MIB,
            )
        )
    return out


def workers(processes: Iterable[ProcessInfo], root: int) -> list[ProcessInfo]:
    """The model worker processes of the tree, by pid."""
    infos = sorted(processes, key=lambda info: info.pid)
    roles = classify(infos, root)
    return [info for info in infos if roles[info.pid] in WORKER_ROLES]


def snapshot(root: int) -> list[ProcessInfo]:
    """``root`` and every live descendant, with RSS (and PSS where readable).

    Raises :class:`BenchError` when psutil is missing or ``root`` does not exist.
    """
    try:
        import psutil
    except ImportError as exc:
        raise BenchError("--server-pid needs psutil (pip install psutil)") from exc
    try:
        top = psutil.Process(root)
        tree = [top, *top.children(recursive=True)]
    except psutil.Error as exc:
        raise BenchError(f"cannot inspect server process {root}: {exc}") from exc
    out = []
    for proc in tree:
        try:
            with proc.oneshot():
                info = ProcessInfo(
                    pid=proc.pid,
                    ppid=proc.ppid(),
                    name=proc.name(),
                    cmdline=tuple(proc.cmdline()),
                    rss=proc.memory_info().rss,
                    pss=_pss(proc, psutil),
                )
        except psutil.NoSuchProcess:
            continue  # exited while we looked
        except psutil.Error as exc:
            raise BenchError(f"cannot inspect process {proc.pid}: {exc}") from exc
        out.append(info)
    return out


def _pss(proc: Any, psutil: Any) -> int | None:
    try:
        return int(proc.memory_full_info().pss)
    except (psutil.AccessDenied, AttributeError):
        return None


def check_pid(pid: int) -> None:
    """:class:`BenchError` unless process ``pid`` exists and can be inspected."""
    snapshot(pid)
