"""``mqserve start|stop|status`` as an operator runs them: real Redis, real gunicorn.

Each stack gets a short ``MQSERVE_HOME`` under /tmp (the Redis unix socket path is
limited to 107 bytes) and free ports chosen here. Teardown stops every stack and kills
whatever it recorded, even when a test fails.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.processes import free_port

MQSERVE = Path(sys.executable).with_name("mqserve")
MANIFEST = {
    "runtime": "python",
    "model": {"modelName": "noop", "handler": "noop_handler.py", "modelVersion": "1.0"},
    "archiverVersion": "0.12.0",
}

if shutil.which("redis-server") is None:  # CI installs it; never skip silently
    raise RuntimeError("redis-server is required: apt-get install -y redis-server")


def build_noop_mar(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps(MANIFEST))
        mar.writestr("noop_handler.py", "def handle(data, context):\n    return data\n")


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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
        self.config = self.root / "config.properties"
        self.config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.port}\n"
            f"metrics_address=http://127.0.0.1:{self.metrics_port}\n"
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

    def processes(self) -> list[psutil.Process]:
        """The runner and everything below it (Redis, gunicorn master and workers)."""
        runner = psutil.Process(int((self.home / "run" / "mqserve.pid").read_text().split()[0]))
        return [runner, *runner.children(recursive=True)]

    def key(self, role: str = "management") -> str:
        data = json.loads((self.home / "key_file.json").read_text())
        return str(data[role]["key"])

    def request(
        self, method: str, path: str, key: str | None = None, port: int | None = None
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=30)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def cleanup(self) -> None:
        if (self.home / "run" / "mqserve.pid").exists():
            self.stop()
        for proc in self.seen:  # a safety net: never leave a stack behind
            if not gone(proc):
                proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[Callable[[], Server]]:
    made: list[Server] = []

    def make() -> Server:
        made.append(Server())
        return made[-1]

    yield make
    for server in made:
        server.cleanup()


def test_start_serve_stop_and_restart_keeps_the_registry(servers: Callable[[], Server]) -> None:
    server = servers()
    server.start("--enable-model-api")
    key = server.key()
    assert server.request("GET", "/models", key) == (200, {"models": []})
    status, body = server.request("GET", "/models")
    assert (status, body["type"]) == (400, "InvalidKeyException")

    status, body = server.request("POST", "/models?url=noop.mar&initial_workers=0", key)
    assert status == 200, body
    assert "noop" in body["status"]

    processes = server.processes()
    names = " ".join(" ".join(p.cmdline()) for p in processes)
    assert "redis-server" in names
    assert "gunicorn" in names
    result = server.stop()
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: all(gone(p) for p in processes))
    assert not (server.home / "key_file.json").exists()
    assert not (server.home / "run" / "mqserve.pid").exists()
    assert not (server.home / "run" / "redis.sock").exists()

    server.start()
    models = server.request("GET", "/models", server.key())
    assert models == (200, {"models": [{"modelName": "noop", "modelUrl": "noop.mar"}]})
    assert server.key() != key


def test_ports_listen_on_loopback_only(servers: Callable[[], Server]) -> None:
    server = servers()
    server.start()
    listening = {
        (conn.laddr.ip, conn.laddr.port)
        for proc in server.processes()
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }
    # The three API ports, on loopback; Redis listens on its unix socket only.
    ports = {server.port, server.inference_port, server.metrics_port}
    assert listening == {("127.0.0.1", port) for port in ports}


def test_models_flag_registers_at_startup(servers: Callable[[], Server]) -> None:
    server = servers()
    server.start("--models", "noop.mar")
    status, body = server.request("GET", "/models/noop", server.key())
    assert status == 200, body
    assert body[0]["loadedAtStartup"] is True
    # TorchServe's default for startup models: default_workers_per_model, else #GPUs,
    # else #CPUs; the stack's supervisor starts them.
    expected = os.cpu_count() or 1
    assert body[0]["minWorkers"] == expected

    def ready() -> bool:
        workers = server.request("GET", "/models/noop", server.key())[1][0]["workers"]
        return [w["status"] for w in workers] == ["READY"] * expected

    assert wait_until(ready, 120)
    worker_pids = [
        w["pid"] for w in server.request("GET", "/models/noop", server.key())[1][0]["workers"]
    ]
    assert all(psutil.pid_exists(pid) for pid in worker_pids)

    assert server.stop().returncode == 0
    server.start("--models", "noop.mar")  # already in the registry: skipped, not fatal
    assert server.request("GET", "/models/noop", server.key())[0] == 200
    assert "already registered" in (server.home / "logs" / "mqserve.log").read_text()


def test_two_stacks_run_side_by_side(servers: Callable[[], Server]) -> None:
    first, second = servers(), servers()
    first.start("--enable-model-api")
    second.start()
    status, _ = first.request("POST", "/models?url=noop.mar&initial_workers=0", first.key())
    assert status == 200
    assert second.request("GET", "/models", second.key()) == (200, {"models": []})
    assert first.request("GET", "/models", first.key())[1]["models"][0]["modelName"] == "noop"
    assert first.request("GET", "/models", second.key())[0] == 400  # keys are per stack

    assert first.stop().returncode == 0
    assert second.request("GET", "/models", second.key())[0] == 200


def test_second_start_is_refused_while_running(servers: Callable[[], Server]) -> None:
    server = servers()
    server.start()
    pid = server.processes()[0].pid
    result = server.mqserve("start", "--ts-config", str(server.config))
    assert result.returncode == 1
    assert f"mqserve is already running (pid {pid}); run `mqserve stop` first" in result.stderr
    assert "Traceback" not in result.stderr
    assert server.mqserve("status").stdout == f"mqserve is running (pid {pid})\n"
    assert server.request("GET", "/models", server.key())[0] == 200


def test_stop_and_status_when_not_running_exit_1(servers: Callable[[], Server]) -> None:
    server = servers()
    result = server.stop()
    assert (result.returncode, result.stderr) == (1, "mqserve is not running\n")
    status = server.mqserve("status")
    assert (status.returncode, status.stdout) == (1, "mqserve is not running\n")


def test_a_dying_child_stops_the_whole_stack(servers: Callable[[], Server]) -> None:
    server = servers()
    server.start()
    processes = server.processes()
    redis_server = next(p for p in processes if "redis-server" in " ".join(p.cmdline()))
    redis_server.kill()
    assert wait_until(lambda: all(gone(p) for p in processes))
    assert not (server.home / "run" / "mqserve.pid").exists()
    assert not (server.home / "key_file.json").exists()
    assert "redis exited with code" in (server.home / "logs" / "mqserve.log").read_text()
    assert server.mqserve("status").returncode == 1
