"""``scripts/bench compare`` against a real mqserve (``--only mqserve``), the guarantee
that a server it started is stopped with every process (a real mqserve stack with
workers; a stand-in ``torchserve`` whose frontend leaves its worker behind), and the
slow clients against a real socket. TorchServe itself is not installed by the tests:
that takes PyPI and minutes; ``--only mqserve`` runs every measure's code path, and the
stand-in the TorchServe launch and stop.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench import compare, servers
from bench.cli import main
from bench.client import BenchError
from bench.lifecycle import NOOP_HANDLER, write_archive
from bench.slow import SLOW_PREFIX, SlowClients
from tests.support.processes import wait_for


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line or working directory contains ``text``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if text in " ".join(proc.cmdline()) or text in proc.cwd():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("measure "))
    rows = {}
    for line in lines[start + 2 :]:
        if line.startswith("note:") or not line.strip():
            continue
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_compare_only_mqserve_prints_every_measure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    client = "wrk" if shutil.which("wrk") else "python"
    code = main(
        ["compare", "--only", "mqserve", "--duration", "1", "--state-dir", str(state),
         "--client", client, "--markdown", str(tmp_path / "perf.md")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = table_rows(captured.out)
    assert list(rows) == [m.label for m in compare.MEASURES]
    for measure in compare.MEASURES:
        torchserve, mqserve, ratio, target, _met = rows[measure.label]
        assert (torchserve, ratio) == ("-", "-")
        assert mqserve.endswith(measure.unit), (measure.label, mqserve)
        assert float(mqserve.split()[0].replace(",", "")) > 0
        assert target == measure.goal.text(measure.unit)
    assert "TorchServe" not in [line.split(":")[0] for line in captured.out.splitlines()[:8]]
    assert "mqserve: register" in captured.err  # progress goes to stderr
    markdown = (tmp_path / "perf.md").read_text()
    for measure in compare.MEASURES:
        assert f"| {measure.label} | - |" in markdown
    assert "| mqserve | commit " in markdown
    # Stopped with everything it started: nothing runs from the state directory.
    wait_for(lambda: not processes_mentioning(str(state)), 30, "the stack to be gone")
    assert not (state / "torchserve-venv").exists()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_failure_inside_stops_mqserve_and_its_workers(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    write_archive(store, "bench-noop", NOOP_HANDLER)
    seen: list[int] = []
    with (
        pytest.raises(BenchError, match="on purpose"),
        servers.running("mqserve", tmp_path / "state", store) as server,
    ):
        server.endpoint.call(
            "POST",
            "/models",
            {"url": "bench-noop.mar", "initial_workers": 2, "synchronous": "true"},
        )
        workers = server.worker_pids()
        assert len(workers) == 2
        seen += [proc.pid for proc in server.processes()]
        assert set(workers) <= set(seen) and server.root_pid in seen
        raise BenchError("on purpose")
    left = [pid for pid in seen if _alive(pid)]
    for pid in left:  # never leave a stack behind, even when failing
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert len(seen) > 4  # launcher, redis, APIs, supervisor, workers
    assert left == []


def test_unknown_server_kind(tmp_path: Path) -> None:
    with (
        pytest.raises(BenchError, match="unknown server"),
        servers.running("litserve", tmp_path, tmp_path),
    ):
        pass


# -- slow clients against a socket that records what arrives --------------------------------


class Recorder:
    """A TCP server that keeps every connection's bytes and never answers; ``close_first``
    closes the first connection once it has sent 3 bytes."""

    def __init__(self, close_first: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.close_first = close_first
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.accepting = threading.Thread(target=self.accept, daemon=True)
        self.accepting.start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                buffer = bytearray()
                self.received.append(buffer)
                self.conns.append(conn)
                index = len(self.received) - 1
            thread = threading.Thread(target=self.read, args=(conn, buffer, index), daemon=True)
            thread.start()
            self.threads.append(thread)

    def read(self, conn: socket.socket, buffer: bytearray, index: int) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(64)
                except OSError:
                    return
                if not data:
                    return
                buffer.extend(data)
                if self.close_first and index == 0 and len(buffer) >= 3:
                    return

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            with_suppressed_close(conn)


def with_suppressed_close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.close()


def test_slow_clients_trickle_one_byte_per_connection_per_interval(recorder: Recorder) -> None:
    url = f"http://127.0.0.1:{recorder.port}/predictions/x"
    with SlowClients(url, count=5, interval=0.05) as slow:
        slow.wait_rounds(4)
        wait_for(lambda: len(recorder.received) == 5, 10, "5 connections")
        wait_for(lambda: all(len(b) >= 4 for b in recorder.received), 10, "4 bytes on each")
        assert slow.reopened == 0
        for buffer in recorder.received:
            data = bytes(buffer)
            # A prefix of the never-ending header: no request ever completes.
            assert SLOW_PREFIX.startswith(data) or data.startswith(SLOW_PREFIX)
            assert b"\r\n\r\n" not in data


def test_a_closed_slow_connection_is_opened_again() -> None:
    server = Recorder(close_first=True)
    try:
        url = f"http://127.0.0.1:{server.port}/"
        with SlowClients(url, count=2, interval=0.05) as slow:
            wait_for(lambda: slow.reopened >= 1, 20, "the closed connection reopened")
            wait_for(lambda: len(server.received) >= 3, 10, "a third connection")
    finally:
        server.close()


def test_slow_clients_that_cannot_connect_say_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with (
            SlowClients(f"http://127.0.0.1:{port}/", count=2) as slow,
            pytest.raises(BenchError, match="slow clients to"),
        ):
            slow.wait_rounds(1, timeout=10)


# -- the TorchServe launch, against a stand-in for torchserve -------------------------------

FAKE_TORCHSERVE = '''#!{python}
"""A stand-in for ``torchserve``: ``--start --foreground`` runs a "frontend" child that
answers /ping and GET /models on the configured ports and starts one "model worker" in
a session of its own; ``--stop`` SIGTERMs the frontend (from $TMPDIR/.model_server.pid),
which exits without stopping its worker, as a crashed frontend would leave it."""
import os, signal, subprocess, sys, tempfile
from pathlib import Path

pid_file = Path(tempfile.gettempdir()) / ".model_server.pid"
if "--stop" in sys.argv:
    os.kill(int(pid_file.read_text()), signal.SIGTERM)
    sys.exit(0)
config = sys.argv[sys.argv.index("--ts-config") + 1]
frontend = subprocess.Popen([sys.executable, "-c", FRONTEND, config])
pid_file.write_text(str(frontend.pid))
sys.exit(frontend.wait())
'''

FRONTEND = r"""
import http.server, os, subprocess, sys, threading
props = dict(line.split("=", 1) for line in open(sys.argv[1]).read().splitlines() if "=" in line)
worker = "model_service_" + "worker.py"  # the name only in the worker's own command line
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", worker],
                 start_new_session=True)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"status": "Healthy"}' if self.path == "/ping" else b'{"models": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
for key in ("inference_address", "management_address"):
    port = int(props[key].rsplit(":", 1)[1])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Event().wait()
"""


def test_torchserve_is_stopped_with_a_worker_its_frontend_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    venv = state / "torchserve-venv"
    (venv / "bin").mkdir(parents=True)
    (venv / servers.VENV_MARKER).write_text(servers.venv_marker_text())  # no install
    script = venv / "bin" / "torchserve"
    script.write_text(
        FAKE_TORCHSERVE.format(python=sys.executable).replace(
            "FRONTEND, config", f"{FRONTEND!r}, config"
        )
    )
    script.chmod(0o755)
    monkeypatch.setattr(servers, "check_java", lambda: "/usr/bin/java")
    store = tmp_path / "store"
    store.mkdir()
    with servers.running("torchserve", state, store) as server:
        wait_for(lambda: len(server.worker_pids()) == 1, 30, "the stand-in's worker")
        seen = [proc.pid for proc in server.processes()]
        home = state / "torchserve-run"
        # Its pid file is private to this run, and its config is the benchmark's.
        assert (home / "tmp" / ".model_server.pid").is_file()
        config = (home / "config.properties").read_text()
        assert "disable_token_authorization=true" in config and f"model_store={store}" in config
    left = [pid for pid in seen if _alive(pid)]
    for pid in left:  # never leave the stand-in's worker behind, even when failing
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert len(seen) == 3  # launcher, frontend, worker (in its own session)
    assert left == []
