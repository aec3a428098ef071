"""``mqserve batch`` as a user runs it, against a stack started by ``mqserve start``.

The stack gets a short ``MQSERVE_HOME`` under /tmp (the Redis unix socket path is
limited to 107 bytes) and free ports; ``mqserve batch`` finds its Redis through the
settings the running stack wrote into that home.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import free_port, kill_recorded, wait_for

MQSERVE = Path(sys.executable).with_name("mqserve")
MANIFEST = {
    "runtime": "python",
    "model": {"modelName": "echo", "handler": "echo_handler.py", "modelVersion": "1.0"},
    "archiverVersion": "0.12.0",
}
HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [{"echo": row.get("body")} for row in data]
"""


class Stack:
    """One ``mqserve start`` in a private home, with an ``echo`` archive in its store."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mqb-", dir="/tmp"))
        self.home = self.root / "h"
        store = self.root / "store"
        store.mkdir()
        with zipfile.ZipFile(store / "echo.mar", "w") as mar:
            mar.writestr("MAR-INF/MANIFEST.json", json.dumps(MANIFEST))
            mar.writestr("echo_handler.py", HANDLER)
        self.port = free_port()
        config = self.root / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{free_port()}\n"
            f"management_address=http://127.0.0.1:{self.port}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\n"
            f"grpc_inference_port={free_port()}\n"
            f"grpc_management_port={free_port()}\n"
        )
        started = self.mqserve(
            "start", "--ts-config", str(config), "--model-store", str(store), "--enable-model-api"
        )
        assert started.returncode == 0, started.stdout + started.stderr

    def env(self) -> dict[str, str]:
        """The environment of a user whose ``MQSERVE_HOME`` is this stack's."""
        env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE",)}
        env.pop("MQSERVE_REDIS_URL", None)
        env["MQSERVE_HOME"] = str(self.home)
        return env

    def mqserve(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(MQSERVE), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
        )

    def register(self, workers: int) -> None:
        self.manage("POST", f"/models?url=echo.mar&initial_workers={workers}&synchronous=true")

    def manage(self, method: str, path: str) -> None:
        """One management call that must answer 200."""
        key = json.loads((self.home / "key_file.json").read_text())["management"]["key"]
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, headers={"Authorization": f"Bearer {key}"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
        finally:
            conn.close()

    def cleanup(self) -> None:
        """``mqserve stop``; then, even if it failed or hung, kill what is still recorded."""
        try:
            if (self.home / "run" / "mqserve.pid").exists():
                self.mqserve("stop")
        finally:
            kill_recorded(self.home)
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def stack() -> Iterator[Stack]:
    made = Stack()
    try:
        yield made
    finally:
        made.cleanup()


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_writes_every_result_in_order(stack: Stack, tmp_path: Path) -> None:
    stack.register(2)
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(2000)))
    result = stack.mqserve("batch", "echo", "inputs.jsonl", "-o", "results.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_lines(tmp_path / "results.jsonl") == [
        {"index": i, "status": 200, "result": {"echo": {"n": i}}} for i in range(2000)
    ]
    assert "all 2000 items succeeded" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_times_out_cancels_and_exits_2(stack: Stack, tmp_path: Path) -> None:
    stack.register(0)  # nobody serves the model: the job cannot finish
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('"a"\n"b"\n')
    out = tmp_path / "out.jsonl"
    result = stack.mqserve("batch", "echo", str(inputs), "-o", str(out), "--timeout", "1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "timed out after 1 s" in result.stderr
    assert read_lines(out) == [{"index": 0, "status": None}, {"index": 1, "status": None}]


def test_batch_errors_are_one_line(stack: Stack, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("1\n")
    result = stack.mqserve("batch", "nope", str(inputs), "-o", str(tmp_path / "o.jsonl"))
    assert (result.returncode, result.stderr) == (1, "Error: Model not found: nope\n")


def test_ctrl_c_leaves_the_job_and_attach_prints_its_results(stack: Stack, tmp_path: Path) -> None:
    stack.register(0)  # nobody serves the model yet: the job waits in its queue
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(50)))
    stderr = tmp_path / "first.err"
    with stderr.open("w") as err:
        first = subprocess.Popen(
            [str(MQSERVE), "batch", "echo", str(inputs), "-o", str(tmp_path / "first.jsonl")],
            env=stack.env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            # As at a terminal: a suite started in the background (`cmd &` in a script)
            # has SIGINT ignored, and a Python started so keeps ignoring it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        submitted = re.compile(r"job ([0-9a-f]{32}): 50 items\nbatch")  # then the progress
        wait_for(lambda: submitted.search(stderr.read_text()), 60, "the job id")
        first.send_signal(signal.SIGINT)  # the user presses Ctrl-C
        assert first.wait(30) == 2, stderr.read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    match = submitted.search(stderr.read_text())
    assert match is not None
    job_id = match.group(1)
    assert f"mqserve batch --attach {job_id} -o FILE" in stderr.read_text()
    assert "Traceback" not in stderr.read_text()
    assert not (tmp_path / "first.jsonl").exists()

    stack.manage("PUT", "/models/echo?min_worker=1&synchronous=true")
    result = stack.mqserve("batch", "--attach", job_id, "-o", "results.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"job {job_id} (echo 1.0, " in result.stderr
    assert read_lines(tmp_path / "results.jsonl") == [
        {"index": i, "status": 200, "result": {"echo": {"n": i}}} for i in range(50)
    ]
    assert "all 50 items succeeded" in result.stderr

    unknown = stack.mqserve("batch", "--attach", "0" * 32, "-o", str(tmp_path / "o.jsonl"))
    assert unknown.returncode == 1
    assert unknown.stderr == (
        f"Error: no batch job {'0' * 32}: the id is unknown, or the job expired "
        "(jobs live in Redis for a day)\n"
    )
