"""``mqserve start|stop|status`` as an operator runs them: real Redis, real gunicorn.

The stacks are :class:`tests.support.stack.Server` instances (a short home under /tmp,
free ports, ``stop_grace=3``). Teardown stops every stack and kills whatever it recorded
(pid files, their descendants, the model workers), even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
import redis

from control.core import keys
from tests.support.stack import (
    STOP_GRACE,
    Server,
    aof_holds,
    build_noop_mar,
    gone,
    models_status,
    predict,
    register,
    wait_until,
)

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


@pytest.fixture
def servers() -> Iterator[Callable[[], Server]]:
    """Makes stacks; each is cleaned up after the test, even if another's cleanup fails."""
    with contextlib.ExitStack() as cleanups:

        def make() -> Server:
            server = Server()
            cleanups.callback(server.cleanup)
            return server

        yield make


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
        # gRPC binds an IPv6 socket to the IPv4-mapped loopback address: still loopback.
        (conn.laddr.ip.removeprefix("::ffff:"), conn.laddr.port)
        for proc in server.processes()
        for conn in proc.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    }
    # The three HTTP ports and the two gRPC ports, on loopback; Redis listens on its
    # unix socket only.
    ports = {server.port, server.inference_port, server.metrics_port, *server.grpc_ports}
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


def test_a_killed_supervisor_is_restarted_and_adopts_its_workers(
    servers: Callable[[], Server],
) -> None:
    server = servers()
    server.start("--enable-model-api")
    register(server, "noop.mar", 1)

    def worker_pids() -> list[int]:
        status, body = server.request("GET", "/models/noop", server.key(), timeout=10)
        assert status == 200, body
        return [int(w["pid"]) for w in body[0]["workers"]]

    [pid] = worker_pids()
    worker = psutil.Process(pid)
    assert predict(server) == 200
    old = server.recorded()["supervisor"]
    server.everything()  # its workers too, for the cleanup
    registry = redis.Redis(unix_socket_path=str(server.home / "run" / "redis.sock"))
    answers: list[int] = []

    def adopted() -> bool:
        """Predicting all along: the new supervisor has announced itself, and the one
        worker is still the one from before."""
        answers.append(predict(server, timeout=10))
        new = server.recorded().get("supervisor")
        if new is None or new.pid == old.pid:
            return False
        beat = registry.hget(keys.host(socket.gethostname()), "heartbeat")
        announced = beat is not None and float(beat) > new.create_time()
        return announced and worker_pids() == [pid]

    try:
        old.kill()
        assert wait_until(adopted, 60), server.log("supervisor")
        # A little longer under the new supervisor: it keeps the worker, starts no other.
        for _ in range(20):
            answers.append(predict(server, timeout=10))
        assert worker_pids() == [pid]
    finally:
        registry.close()
    assert set(answers) == {200}, answers  # the worker served throughout: nothing failed
    assert not gone(worker) and worker.create_time() == psutil.Process(pid).create_time()
    assert "supervisor exited unexpectedly (killed by SIGKILL)" in server.log()
    assert server.healthy()


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
        "grpc, supervisor alive; run `mqserve stop`)\n",
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
