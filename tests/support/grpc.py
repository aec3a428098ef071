"""The gRPC servers as the stack runs them (``python -m control.grpc``), for the tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from control.core.settings import Settings
from control.grpc.probe import answers_grpc
from tests.support.processes import free_port, started, wait_for


@contextmanager
def grpc_process(settings: Settings, workdir: Path) -> Iterator[Settings]:
    """Both gRPC services on free loopback ports, exactly as the launcher starts them
    (the settings file in ``$MQSERVE_SETTINGS``); yields the settings naming the ports
    once both answer a Ping. Stopped with SIGTERM on exit, which must be a graceful stop
    (exit status 0) when the test passed."""
    settings = settings.replace(grpc_inference_port=free_port(), grpc_management_port=free_port())
    workdir.mkdir(parents=True, exist_ok=True)
    port = settings.grpc_inference_port
    settings_file = workdir / f"settings-grpc-{port}.json"
    settings_file.write_text(settings.to_json())
    log_path = workdir / f"grpc-{port}.log"
    env = {**os.environ, "MQSERVE_SETTINGS": str(settings_file)}
    argv = [sys.executable, "-m", "control.grpc"]
    with started(argv, log=log_path, env=env, grace=15) as proc:

        def up() -> bool:
            if proc.poll() is not None:
                return True
            tls = settings.enable_grpc_ssl
            return all(
                answers_grpc(*settings.grpc_bind(w), tls=tls) for w in ("inference", "management")
            )

        wait_for(up, 30, "the gRPC servers")
        assert proc.poll() is None, log_path.read_text()
        yield settings
    # Stopped by SIGTERM: a graceful stop exits 0.
    assert proc.returncode == 0, log_path.read_text()
