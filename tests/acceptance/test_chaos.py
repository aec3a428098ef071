"""Chaos under load: one host's stack, started as a user starts it (``mqserve start``),
kill -9 one component at a time while clients keep sending, and count what came back.

Every scenario runs the same bounded load on the echo model (2 workers): 4 client
threads, 40 requests/s in all, each request a unique token that the handler returns,
every client timeout 30 s (:class:`tests.support.chaos.Load`, whose docstring defines
answered / failed / lost). The load runs from a healthy baseline, through the fault,
until the stack has converged, and a few seconds past it. Then:

* lost == 0, always: every request got its own answer or a TorchServe-shaped error;
* failed is bounded where a bound means something: a killed gunicorn worker resets at
  most the requests in flight on it (one per client thread), a killed supervisor costs
  nothing (its workers keep serving and its successor adopts them), a killed model
  worker costs at most its one in-flight request (batch_size 1) plus a small margin;
* the stack converges within :data:`CONVERGE_S`: describe shows ``minWorkers`` workers
  READY (live processes), a prediction answers its own token, ``GET /models`` is what it
  was, and every request sent after that point was answered; ``mqserve status`` says
  the stack is healthy again.

The embedded-Redis scenarios share one module-scoped stack (each counts only its own
load and starts from a converged stack, which the previous scenario's convergence
guarantees); the external Redis runs a stack of its own. Each row is printed in the
"chaos figures" table at the end of the run (tests/acceptance/conftest.py).
"""

from __future__ import annotations

import collections
import http.client
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import chaos
from tests.support.archives import build_mar
from tests.support.processes import RestartableRedis, restartable_redis
from tests.support.stack import Server, aof_holds, gone, register, wait_until

MODEL = "echo"
WORKERS = 2
THREADS = 4
RATE = 40.0
CLIENT_TIMEOUT = 30.0
#: Seconds from the kill until the stack must have converged.
CONVERGE_S = 60.0
#: Requests that must be answered after convergence ("a few seconds" of load).
TAIL_REQUESTS = 60
#: The API runs this many gunicorn workers per port (control.core.settings.api_processes).
API_PROCESSES = 2
#: The external Redis stays down until this many requests have been refused (503).
OUTAGE_FAILURES = 40
# The echo handler holds each request 20 ms, so that a killed worker has a request in
# flight about 40 % of the time (40 req/s over 2 workers), as real models do.
ECHO_HANDLER = """import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(0.02)
    return [row.get("body") or row.get("data") for row in data]
"""


def start_echo_stack(*extra: str) -> Server:
    server = Server()
    try:
        build_mar(
            server.store / f"{MODEL}.mar",
            MODEL,
            handler="echo_handler.py",
            extra={"echo_handler.py": ECHO_HANDLER.encode()},
        )
        server.start("--enable-model-api", *extra)
        register(server, f"{MODEL}.mar", WORKERS)
        server.everything()
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="module")
def stack() -> Iterator[Server]:
    """One stack with the embedded Redis and the echo model, shared by the scenarios."""
    server = start_echo_stack()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def external(tmp_path: Path) -> Iterator[tuple[Server, RestartableRedis]]:
    """A stack on an external Redis the test can stop and start (``--redis-url``)."""
    with restartable_redis(tmp_path / "redis") as redis_server:
        server = start_echo_stack("--redis-url", redis_server.url)
        try:
            yield server, redis_server
        finally:
            server.cleanup()  # before Redis stops: the workers drain through it


def kill(proc: psutil.Process) -> Callable[[chaos.Load], None]:
    """The fault: SIGKILL ``proc``."""
    return lambda load: proc.kill()


def describe(server: Server) -> dict[str, Any]:
    status, body = server.request("GET", f"/models/{MODEL}", server.key(), timeout=5)
    assert status == 200, body
    return dict(body[0])


def worker_pids(server: Server) -> list[int]:
    return sorted(int(w["pid"]) for w in describe(server)["workers"])


def models(server: Server) -> tuple[int, Any]:
    return server.request("GET", "/models", server.key(), timeout=5)


def echoes(server: Server) -> bool:
    """One prediction answers 200 with its own token."""
    token = f"probe-{time.monotonic_ns()}"
    conn = http.client.HTTPConnection("127.0.0.1", server.inference_port, timeout=10)
    headers = {"Authorization": f"Bearer {server.key('inference')}", "Content-Type": "text/plain"}
    try:
        conn.request("POST", f"/predictions/{MODEL}", body=token.encode(), headers=headers)
        response = conn.getresponse()
        return response.status == 200 and response.read() == token.encode()
    finally:
        conn.close()


def converged(server: Server, registry: tuple[int, Any], also: Callable[[], bool]) -> bool:
    """minWorkers workers READY (live processes), a prediction echoes, /models unchanged,
    and the scenario's own condition ``also``."""
    try:
        if not also() or models(server) != registry:
            return False
        model = describe(server)
        workers = model["workers"]
        ready = [w for w in workers if w["status"] == "READY" and psutil.pid_exists(w["pid"])]
        if not len(workers) == len(ready) == model["minWorkers"] == WORKERS:
            return False
        return echoes(server)
    except (OSError, ValueError, AssertionError):
        return False


def details(load: chaos.Load, outcome: chaos.Outcome) -> dict[str, int]:
    """How the requests with ``outcome`` ended (status or exception), for the messages."""
    return dict(collections.Counter(s.detail for s in load.shots() if s.outcome is outcome))


def under_load(
    server: Server,
    fault: str,
    inject: Callable[[chaos.Load], None],
    also: Callable[[], bool] = lambda: True,
) -> tuple[chaos.Tally, dict[str, int]]:
    """Run the load, ``inject`` the fault (given the running load), wait until converged
    (and ``also``), record.

    Returns the scenario's tally and how its failed requests ended; asserts lost == 0,
    convergence within :data:`CONVERGE_S`, every request after it answered, and a
    healthy ``mqserve status``.
    """
    registry = models(server)
    assert registry[0] == 200, registry
    url = f"http://127.0.0.1:{server.inference_port}/predictions/{MODEL}"
    auth = {"Authorization": f"Bearer {server.key('inference')}"}
    load = chaos.Load(url, threads=THREADS, rate=RATE, timeout=CLIENT_TIMEOUT, headers=auth)
    with load:
        # A healthy baseline first: the fault is the only thing the figures measure.
        assert wait_until(lambda: load.tally().answered >= 20, 30), load.tally()
        assert load.tally().answered == load.tally().sent, details(load, chaos.Outcome.FAILED)
        faulted = time.monotonic()
        inject(load)
        ok = wait_until(lambda: converged(server, registry, also), CONVERGE_S)
        took = time.monotonic() - faulted
        assert ok, f"{fault}: not converged after {CONVERGE_S} s; log:\n{server.log()[-3000:]}"
        back = time.monotonic()
        assert wait_until(lambda: load.tally(since=back).sent >= TAIL_REQUESTS, 30)
    tally = load.tally()
    chaos.record(fault, tally, took)
    server.everything()  # what the fault started, for the cleanup
    lost = details(load, chaos.Outcome.LOST)
    assert tally.lost == 0, f"{fault}: {tally}, lost: {lost}"
    after = load.tally(since=back)
    assert after.answered == after.sent, f"{fault}: after convergence {after}"
    assert wait_until(server.healthy, 30), server.mqserve("status").stdout
    return tally, details(load, chaos.Outcome.FAILED)


def test_a_killed_inference_worker_process(stack: Server) -> None:
    master = stack.recorded()["inference"]
    victim = master.children()[0]

    def replaced() -> bool:
        children = [p for p in master.children() if not gone(p)]
        return len(children) == API_PROCESSES and victim not in children

    tally, failed = under_load(stack, "inference API worker kill -9", kill(victim), replaced)
    # Each client thread has one request in flight at most: only those can be reset.
    assert tally.failed <= THREADS, failed
    assert stack.recorded()["inference"].pid == master.pid  # gunicorn's own restart


def test_a_killed_inference_master(stack: Server) -> None:
    old = stack.recorded()["inference"]

    def respawned() -> bool:
        now = stack.recorded().get("inference")
        return now is not None and now.pid != old.pid

    under_load(stack, "inference API master kill -9", kill(old), respawned)
    assert "inference exited unexpectedly (killed by SIGKILL)" in stack.log()


def test_a_killed_supervisor_costs_no_request(stack: Server) -> None:
    old = stack.recorded()["supervisor"]
    workers = worker_pids(stack)

    def adopted() -> bool:
        now = stack.recorded().get("supervisor")
        return now is not None and now.pid != old.pid and worker_pids(stack) == workers

    tally, failed = under_load(stack, "supervisor kill -9", kill(old), adopted)
    # The workers outlive their supervisor and its successor adopts them.
    assert tally.failed == 0, failed
    assert worker_pids(stack) == workers
    assert "supervisor exited unexpectedly (killed by SIGKILL)" in stack.log()


def test_a_killed_model_worker(stack: Server) -> None:
    before = worker_pids(stack)
    victim = psutil.Process(before[0])

    def replaced() -> bool:
        pids = worker_pids(stack)
        return victim.pid not in pids and before[1] in pids

    tally, failed = under_load(stack, "model worker kill -9", kill(victim), replaced)
    # Only its in-flight request (batch_size 1) is answered "Worker died."; the queued
    # ones go to the other worker. The margin covers a request taken as the kill landed.
    assert tally.failed <= 1 + 2, failed
    assert set(failed) <= {"500"}, failed


def test_a_killed_embedded_redis_comes_back_with_the_registry(stack: Server) -> None:
    # A registration made just before the kill is in the append-only file (fsynced
    # every second) and must be there after the restart: converged() compares /models.
    register(stack, "noop.mar", 0)
    assert wait_until(lambda: aof_holds(stack, b"noop.mar"), 10)
    old = stack.recorded()["redis"]

    def respawned() -> bool:
        now = stack.recorded().get("redis")
        return now is not None and now.pid != old.pid

    _, failed = under_load(stack, "embedded redis kill -9", kill(old), respawned)
    # While Redis is down every port answers 503 (JSON); waiting requests ride it out.
    assert set(failed) <= {"503", "500"}, failed
    assert "redis exited unexpectedly (killed by SIGKILL); restarting it in 1 s" in stack.log()


def test_an_external_redis_restarted(external: tuple[Server, RestartableRedis]) -> None:
    server, redis_server = external
    children = {name: proc.pid for name, proc in server.recorded().items()}
    workers = worker_pids(server)

    def restart_redis(load: chaos.Load) -> None:
        redis_server.stop()
        down = time.monotonic()
        # Down long enough that the clients see it (the ports answer 503 meanwhile) and
        # that requests taken before the stop wait through it for their replies.
        assert wait_until(lambda: load.tally(since=down).failed >= OUTAGE_FAILURES, 10)
        redis_server.start()

    def same_processes() -> bool:
        now = {name: proc.pid for name, proc in server.recorded().items()}
        return now == children and worker_pids(server) == workers

    _, failed = under_load(server, "external redis restart", restart_redis, same_processes)
    assert set(failed) <= {"503", "500"}, failed
    # No process of the stack was restarted: everything rode the outage out.
    assert {name: proc.pid for name, proc in server.recorded().items()} == children
    assert worker_pids(server) == workers
