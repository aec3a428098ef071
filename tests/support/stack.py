"""One host's stack as an operator runs it (``mqserve start|stop|status``), for the
acceptance tier: a temporary home, model store and free ports, and the commands to
drive and inspect it.

Each stack gets a short ``MQSERVE_HOME`` under /tmp (the Redis unix socket path is
limited to 107 bytes) and free ports chosen here, with ``stop_grace=3`` so that stops
are quick. :meth:`Server.cleanup` stops the stack and kills whatever it recorded (pid
files, their descendants, the model workers), even when a test failed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.support.processes import free_port, kill_recorded

MQSERVE = Path(sys.executable).with_name("mqserve")
MANIFEST = {
    "runtime": "python",
    "model": {"modelName": "noop", "handler": "noop_handler.py", "modelVersion": "1.0"},
    "archiverVersion": "0.12.0",
}
STOP_GRACE = 3

if shutil.which("redis-server") is None:  # CI installs it; never skip silently
    raise RuntimeError("redis-server is required: apt-get install -y redis-server")


def build_noop_mar(path: Path, name: str = "noop", handler: str | None = None) -> None:
    """A .mar whose module handler returns its input (or runs ``handler``'s source)."""
    model = {**MANIFEST["model"], "modelName": name}  # type: ignore[dict-item]
    manifest = {**MANIFEST, "model": model}
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        mar.writestr("noop_handler.py", handler or "def handle(data, context):\n    return data\n")


def gone(proc: psutil.Process) -> bool:
    """True once ``proc`` has exited (a zombie counts as exited)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` every 50 ms; False if it is still false after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def live_recorded(path: Path) -> psutil.Process | None:
    """The process a pid file names, if that very process (same start time) still runs."""
    try:
        pid, started = path.read_text().split()
        proc = psutil.Process(int(pid))
        if abs(proc.create_time() - float(started)) < 0.01 and not gone(proc):
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


class Server:
    """One stack's home, model store, ports and the commands to drive it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mqs-", dir="/tmp"))
        self.home = self.root / "h"
        self.store = self.root / "store"
        self.store.mkdir()
        build_noop_mar(self.store / "noop.mar")
        self.port = free_port()
        self.inference_port = free_port()
        self.metrics_port = free_port()
        self.grpc_ports = (free_port(), free_port())
        self.config = self.root / "config.properties"
        self.config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.port}\n"
            f"metrics_address=http://127.0.0.1:{self.metrics_port}\n"
            f"grpc_inference_port={self.grpc_ports[0]}\n"
            f"grpc_management_port={self.grpc_ports[1]}\n"
            f"stop_grace={STOP_GRACE}\n"
        )
        self.seen: list[psutil.Process] = []

    def mqserve(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE",)}
        env.pop("MQSERVE_REDIS_URL", None)
        env["MQSERVE_HOME"] = str(self.home)
        return subprocess.run(
            [str(MQSERVE), *args], env=env, capture_output=True, text=True, timeout=180
        )

    def start(self, *extra: str) -> None:
        result = self.mqserve(
            "start", "--ts-config", str(self.config), "--model-store", str(self.store), *extra
        )
        assert result.returncode == 0, result.stdout + result.stderr
        self.seen.extend(self.processes())

    def stop(self) -> subprocess.CompletedProcess[str]:
        return self.mqserve("stop")

    def healthy(self) -> bool:
        """``mqserve status`` exits 0: the launcher and every child are up."""
        status = self.mqserve("status")
        return status.returncode == 0 and status.stdout.startswith("mqserve is running (pid ")

    def processes(self) -> list[psutil.Process]:
        """The runner and everything below it (Redis, gunicorn master and workers)."""
        runner = psutil.Process(int((self.home / "run" / "mqserve.pid").read_text().split()[0]))
        return [runner, *runner.children(recursive=True)]

    def recorded(self) -> dict[str, psutil.Process]:
        """Each live process named by a pid file (the start time must match, as in the CLI)."""
        found = {}
        for path in (self.home / "run").glob("*.pid"):
            proc = live_recorded(path)
            if proc is not None:
                found[path.stem] = proc
        return found

    def recorded_workers(self) -> dict[str, psutil.Process]:
        """Each live model worker named by ``run/workers/<wid>.pid``, by worker id.

        Workers outlive a supervisor that was killed (its successor adopts them), so they
        are not always below a recorded process.
        """
        found = {}
        for path in (self.home / "run" / "workers").glob("*.pid"):
            proc = live_recorded(path)
            if proc is not None:
                found[path.stem] = proc
        return found

    def everything(self) -> list[psutil.Process]:
        """Every recorded process and every process below one (model workers too)."""
        procs = list(self.recorded().values()) + list(self.recorded_workers().values())
        for proc in list(procs):
            with contextlib.suppress(psutil.Error):
                procs.extend(proc.children(recursive=True))
        self.seen.extend(procs)
        return procs

    def log(self, name: str = "mqserve") -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    def respawned(self, name: str, old: psutil.Process, timeout: float = 60) -> psutil.Process:
        """Wait until the launcher has recorded a new live process for ``name``; that one.

        The pid files are read once per check: the old process may die (or the new one
        be replaced) between two reads.
        """
        found: list[psutil.Process] = []

        def fresh() -> bool:
            proc = self.recorded().get(name)
            if proc is None or proc.pid == old.pid:
                return False
            found[:] = [proc]
            return True

        assert wait_until(fresh, timeout), f"{name} was not restarted; launcher log:\n{self.log()}"
        self.seen.append(found[0])
        return found[0]

    def key(self, role: str = "management") -> str:
        data = json.loads((self.home / "key_file.json").read_text())
        return str(data[role]["key"])

    def request(
        self,
        method: str,
        path: str,
        key: str | None = None,
        port: int | None = None,
        body: str | None = None,
        timeout: float = 30,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def cleanup(self) -> None:
        """``mqserve stop`` if anything is recorded; then, even when that stop failed or
        hung, SIGKILL whatever is still recorded or was seen running, wait until it has
        exited, and remove the stack's directory."""
        try:
            with contextlib.suppress(OSError):
                self.everything()
            if any((self.home / "run").glob("*.pid")):
                self.stop()
        finally:
            # A safety net: never leave a stack behind.
            kill_recorded(self.home)
            for proc in self.seen:
                with contextlib.suppress(psutil.Error):
                    if not gone(proc):
                        proc.kill()
            psutil.wait_procs(self.seen, timeout=10)
            shutil.rmtree(self.root, ignore_errors=True)


def aof_holds(server: Server, text: bytes) -> bool:
    """True once Redis's append-only files hold ``text`` (fsynced every second)."""
    files = (server.home / "redis").rglob("*.aof")
    return any(text in path.read_bytes() for path in files)


def register(server: Server, url: str, workers: int, timeout: float = 120) -> None:
    """Register ``url`` synchronously with ``workers`` workers; assert 200."""
    query = f"/models?url={url}&initial_workers={workers}&synchronous=true"
    status, body = server.request("POST", query, server.key(), timeout=timeout)
    assert status == 200, body


def predict(server: Server, model: str = "noop", timeout: float = 30) -> int:
    """One prediction's HTTP status, or 0 while the inference port does not answer."""
    port, key = server.inference_port, server.key("inference")
    try:
        path = f"/predictions/{model}"
        return server.request("POST", path, key, port, body='{"x": 1}', timeout=timeout)[0]
    except OSError:
        return 0


def models_status(server: Server) -> int:
    """``GET /models``'s status, or 0 while the port does not answer."""
    try:
        return server.request("GET", "/models", server.key(), timeout=5)[0]
    except OSError:
        return 0
