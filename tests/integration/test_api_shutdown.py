"""A stopping API server (SIGTERM, as ``mqserve stop`` sends) finishes its in-flight
requests before it exits: a synchronous register still waiting for its workers when the
signal comes is answered, not cut off (uvicorn's worker, control.http.asgi_worker)."""

from __future__ import annotations

import http.client
import os
import signal
import threading
from pathlib import Path

import psutil
import redis

from control.core import keys
from control.core.settings import Settings
from tests.support.archives import build_mar
from tests.support.processes import api_process, wait_for


def gunicorn_master(port: int) -> psutil.Process:
    """The gunicorn master this test started for ``port``."""
    for child in psutil.Process(os.getpid()).children():
        if f"127.0.0.1:{port}" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no gunicorn master for port {port}")


def test_sigterm_lets_an_in_flight_request_finish(
    stack_settings: Settings, store: Path, tmp_path: Path, real_redis: redis.Redis
) -> None:
    build_mar(store / "noop.mar", "noop")
    # No supervisor runs: a synchronous register waits worker_spawn_timeout plus
    # startup_timeout seconds for a worker that never comes, then answers TorchServe's 500
    # and rolls back.
    settings = stack_settings.replace(worker_spawn_timeout=3)
    with api_process(settings, tmp_path / "mgmt", "management") as base:
        port = int(base.rsplit(":", 1)[1])
        answers: list[tuple[int, bytes]] = []

        def register() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                conn.request(
                    "POST",
                    "/models?url=noop.mar&initial_workers=1&synchronous=true&startup_timeout=1",
                )
                response = conn.getresponse()
                answers.append((response.status, response.read()))
            finally:
                conn.close()

        caller = threading.Thread(target=register)
        caller.start()
        try:
            # The registration is recorded: the request is in flight, waiting.
            wait_for(lambda: real_redis.exists(keys.version("noop", "1.0")), 30, "registration")
            master = gunicorn_master(port)
            master.send_signal(signal.SIGTERM)
            caller.join(60)
        finally:
            caller.join(60)
        assert len(answers) == 1
        status, body = answers[0]
        assert status == 500, body
        assert b"Failed to start workers for model noop version: 1.0" in body
        master.wait(30)  # and then the server is gone
        # The rollback that ran after the signal completed too.
        assert not real_redis.exists(keys.version("noop", "1.0"))
