"""Starting worker processes, and clearing what an earlier supervisor left behind.

A worker is ``python -m workers.process`` with its identity on the command line and
its device in ``CUDA_VISIBLE_DEVICES``, set before the interpreter starts so CUDA never
sees another GPU. It gets ``PR_SET_PDEATHSIG`` so it is told to drain if its
supervisor dies, and its own session so a Ctrl-C aimed at the supervisor does not
bypass the supervisor's orderly drain.
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
from pathlib import Path

import psutil
import redis

from control import keys, observed

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def model_dir(host: str, wid: str) -> Path:
    """Where worker ``wid`` unpacks its archive; removed by the supervisor after exit."""
    return Path(tempfile.gettempdir()) / "mqserve-models" / f"{host}-{wid}"


class WorkerSpawner:
    """Spawns worker processes for one supervisor (implements ``Spawner``)."""

    def __init__(self, settings_file: Path, host: str, log_dir: Path) -> None:
        self._settings_file = settings_file
        self._host = host
        self._log_dir = log_dir

    def __call__(
        self, wid: str, model: str, version: str, slot: int, gpu: int
    ) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "workers.process",
            "--wid",
            wid,
            "--model",
            model,
            "--version",
            version,
            "--slot",
            str(slot),
            "--gpu",
            str(gpu),
            "--host",
            self._host,
        ]
        env = {
            **os.environ,
            "MQSERVE_SETTINGS": str(self._settings_file),
            # The worker sees only its own GPU (as cuda:0), or none at all.
            "CUDA_VISIBLE_DEVICES": str(gpu) if gpu >= 0 else "",
            "PYTHONUNBUFFERED": "1",
        }
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
        _stop_leftover(record.pid, record.wid, timeout)
        observed.remove(client, record)
    for key in client.scan_iter(match=keys.slot("*", "*", "*"), count=200):
        if client.get(key) == host:
            client.delete(key)
    return len(stale)


def _stop_leftover(pid: int, wid: str, timeout: float) -> None:
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
    except (psutil.Error, ValueError):
        return
    if "workers.process" not in cmdline or wid not in cmdline:
        return  # the pid was reused by an unrelated process
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
