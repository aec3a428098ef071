"""``mqserve start|stop|status`` as an operator runs them: real Redis, real gunicorn.

Each stack gets a short ``MQSERVE_HOME`` under /tmp (the Redis unix socket path is
limited to 107 bytes) and free ports chosen here, with ``stop_grace=3`` so that stops
are quick. Teardown stops every stack and kills whatever it recorded (pid files, their
descendants, the model workers), even when a test fails.
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
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from tests.support.processes import free_port

MQSERVE = Path(sys.executable).with_name("mqserve")
MANIFEST = {
    "runtime": "python",
    "model": {"modelName": "noop", "handler": "noop_handler.py", "modelVersion": "1.0"},
    "archiverVersion": "0.12.0",
}

if shutil.which("redis-server") is None:  # CI installs it; never skip silently
    raise RuntimeError("redis-server is required: apt-get install -y redis-server")


STOP_GRACE = 3
# TorchServe calls a module handler with None once, to initialize it: only requests stick.
SLOW_LOAD_HANDLER = """import time


def handle(data, context):
    if data is None:
        time.sleep(600)
    return data
"""
STUCK_HANDLER = """import time


def handle(data, context):
    if data is not None:
        time.sleep(600)
    return data
"""


def build_noop_mar(path: Path, name: str = "noop", handler: str | None = None) -> None:
    model = {**MANIFEST["model"], "modelName": name}  # type: ignore[dict-item]
    manifest = {**MANIFEST, "model": model}
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
        mar.writestr("noop_handler.py", handler or "def handle(data, context):\n    return data\n")


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

    def processes(self) -> list[psutil.Process]:
        """The runner and everything below it (Redis, gunicorn master and workers)."""
        runner = psutil.Process(int((self.home / "run" / "mqserve.pid").read_text().split()[0]))
        return [runner, *runner.children(recursive=True)]

    def recorded(self) -> dict[str, psutil.Process]:
        """Each live process named by a pid file (the start time must match, as in the CLI)."""
        found = {}
        for path in (self.home / "run").glob("*.pid"):
            pid, started = path.read_text().split()
            try:
                proc = psutil.Process(int(pid))
            except psutil.NoSuchProcess:
                continue
            if abs(proc.create_time() - float(started)) < 0.01 and not gone(proc):
                found[path.stem] = proc
        return found

    def everything(self) -> list[psutil.Process]:
        """Every recorded process and every process below one (model workers too)."""
        procs = list(self.recorded().values())
        for proc in list(procs):
            with contextlib.suppress(psutil.Error):
                procs.extend(proc.children(recursive=True))
        self.seen.extend(procs)
        return procs

    def log(self, name: str = "mqserve") -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    def respawned(self, name: str, old: psutil.Process, timeout: float = 60) -> psutil.Process:
        """Wait until the launcher has recorded a new live process for ``name``."""
        assert wait_until(
            lambda: name in self.recorded() and self.recorded()[name].pid != old.pid, timeout
        ), f"{name} was not restarted; launcher log:\n{self.log()}"
        self.seen.append(self.recorded()[name])
        return self.recorded()[name]

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
        with contextlib.suppress(OSError):
            self.everything()
        if any((self.home / "run").glob("*.pid")):
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


# -- the launcher supervises its children ----------------------------------------------


def aof_holds(server: Server, text: bytes) -> bool:
    """True once Redis's append-only files hold ``text`` (fsynced every second)."""
    files = (server.home / "redis").rglob("*.aof")
    return any(text in path.read_bytes() for path in files)


def register(server: Server, url: str, workers: int, timeout: float = 120) -> None:
    query = f"/models?url={url}&initial_workers={workers}&synchronous=true"
    status, body = server.request("POST", query, server.key(), timeout=timeout)
    assert status == 200, body


def predict(server: Server, model: str = "noop", timeout: float = 30) -> int:
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


def test_a_killed_redis_is_restarted_with_the_registry_intact(
    servers: Callable[[], Server],
) -> None:
    server = servers()
    server.start("--enable-model-api")
    register(server, "noop.mar", 0)
    assert wait_until(lambda: aof_holds(server, b"noop"), 10)
    old = server.recorded()["redis"]
    old.kill()
    new = server.respawned("redis", old)
    assert new.pid != old.pid
    models = (200, {"models": [{"modelName": "noop", "modelUrl": "noop.mar"}]})
    assert wait_until(lambda: server.request("GET", "/models", server.key()) == models, 60)
    assert "redis exited unexpectedly (killed by SIGKILL); restarting it in 1 s" in server.log()
    assert wait_until(lambda: server.mqserve("status").returncode == 0, 30)


def test_a_killed_supervisor_is_restarted_and_the_model_serves_again(
    servers: Callable[[], Server],
) -> None:
    server = servers()
    server.start("--enable-model-api")
    register(server, "noop.mar", 1)
    assert predict(server) == 200
    old = server.recorded()["supervisor"]
    server.everything()  # its workers too, for the cleanup
    old.kill()
    server.respawned("supervisor", old)
    assert wait_until(lambda: predict(server, timeout=10) == 200, 120), server.log("supervisor")
    assert "supervisor exited unexpectedly (killed by SIGKILL)" in server.log()
    assert server.mqserve("status").stdout.startswith("mqserve is running (pid ")


def test_a_killed_api_master_is_restarted(servers: Callable[[], Server]) -> None:
    server = servers()
    server.start()
    old = server.recorded()["management"]
    old_workers = old.children()
    old.kill()
    server.respawned("management", old)
    # Its orphaned workers are killed with it: they would hold the port.
    assert wait_until(lambda: all(gone(p) for p in old_workers), 30)
    assert wait_until(lambda: models_status(server) == 200, 60)
    assert "management exited unexpectedly (killed by SIGKILL)" in server.log()


def test_a_child_that_keeps_crashing_stops_the_stack_and_says_why(
    servers: Callable[[], Server],
) -> None:
    server = servers()
    server.start()
    everything = server.everything()
    # A supervisor can no longer start: every restart exits at once with code 1.
    (server.home / "run" / "settings.json").write_text("{not json")
    server.recorded()["supervisor"].kill()
    # Back-off 1 + 2 + 4 + 8 s, then the fifth crash within 60 s gives up.
    assert wait_until(lambda: all(gone(p) for p in everything), 90), server.log()
    message = "supervisor crashed 5 times within 60 s (last: exit code 1); mqserve stopped itself"
    assert message in server.log()
    status = server.mqserve("status")
    assert status.returncode == 1
    assert status.stdout.startswith("mqserve is not running (")
    assert message in status.stdout
    assert not list((server.home / "run").glob("*.pid"))


def test_status_and_stop_after_the_launcher_was_killed(servers: Callable[[], Server]) -> None:
    server = servers()
    server.start("--enable-model-api")
    register(server, "noop.mar", 1)
    everything = server.everything()
    assert len(everything) > 6  # redis, 3 gunicorn masters and their workers, supervisor, worker
    server.recorded()["mqserve"].kill()
    assert wait_until(lambda: "mqserve" not in server.recorded())
    status = server.mqserve("status")
    assert (status.returncode, status.stdout) == (
        1,
        "mqserve is running (launcher gone; redis, management, inference, metrics, "
        "supervisor alive; run `mqserve stop`)\n",
    )
    assert predict(server) == 200  # the children still serve

    result = server.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stopped what the launcher left: redis (pid ")
    assert [p for p in everything if not gone(p)] == []
    assert server.mqserve("status").stdout == "mqserve is not running\n"
    assert not list((server.home / "run").glob("*.pid"))


def test_stop_with_a_stuck_handler_and_a_stuck_sync_register_keeps_the_bound(
    servers: Callable[[], Server],
) -> None:
    server = servers()
    build_noop_mar(server.store / "stuck.mar", "stuck", STUCK_HANDLER)
    build_noop_mar(server.store / "slow.mar", "slow", SLOW_LOAD_HANDLER)
    server.start("--enable-model-api")
    register(server, "stuck.mar", 1)
    stuck = threading.Thread(target=predict, args=(server, "stuck", 120), daemon=True)
    stuck.start()
    answers: list[object] = []

    def register_slow() -> None:
        try:
            query = "/models?url=slow.mar&initial_workers=1&synchronous=true"
            answers.append(server.request("POST", query, server.key(), timeout=120))
        except OSError as exc:
            answers.append(exc)

    loading = threading.Thread(target=register_slow, daemon=True)
    loading.start()
    registry = redis.Redis(unix_socket_path=str(server.home / "run" / "redis.sock"))

    def stuck_both() -> bool:  # describe says READY for a busy worker, as TorchServe does
        states = [registry.hget(key, "state") for key in registry.scan_iter("mqs:o:worker:*")]
        return sorted(states) == [b"BUSY", b"LOADING"]  # type: ignore[type-var]

    try:
        assert wait_until(stuck_both, 60)
    finally:
        registry.close()
    everything = server.everything()
    began = time.monotonic()
    result = server.stop()
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    # The bound: stop_grace for the workers, then SIGKILL (before: 130 s and more).
    assert took < STOP_GRACE + 20, f"mqserve stop took {took:.1f} s"
    assert [p for p in everything if not gone(p)] == []
    stuck.join(30)
    loading.join(30)
    assert not stuck.is_alive()
    assert len(answers) == 1  # the synchronous register was answered or cut off, not left
    assert "did not stop in time" not in result.stderr  # the launcher itself kept the bound
