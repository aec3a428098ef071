"""The process fixtures clean up after a failing test: no process left, no file open.

A small test module runs in a pytest subprocess (``pytester``) with the real helpers of
``tests.support.processes``: a redis-server, the management API under gunicorn and a
supervisor running one worker of a noop model, and then it fails on purpose, once in
the test body and twice inside a fixture's start-up (a supervisor that never reaches
its Redis; a redis url the host check cannot even parse), each time after a
redis-server and gunicorn were started. A thread of the inner run
records every process below it, with its start time, for the whole of each test. Once
the inner run has returned, none of those processes may still run, and no
ResourceWarning (an unclosed log file or client, a ``Popen`` of a process still
running) may have been raised: the inner run treats one as an error, and prints it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from tests.support.processes import wait_for

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

INNER = '''
import json
import os
import threading
from pathlib import Path

import psutil
import pytest

from control.core.home import Home
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import api_process, free_port, redis_server, supervisor_process

RECORD = Path(os.environ["HYGIENE_RECORD"])


def write(kind, proc):
    line = {"kind": kind, "pid": proc.pid, "created": proc.create_time(),
            "cmdline": " ".join(proc.cmdline())}
    with RECORD.open("a") as out:
        out.write(json.dumps(line) + "\\n")


@pytest.fixture(autouse=True)
def recorder():
    """Records every process below this pytest every 20 ms, until the test's teardown
    (fixtures' finalizers included) is over: it is set up first and torn down last."""
    seen, stop = set(), threading.Event()

    def sample():
        while True:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.pid not in seen:
                        write("descendant", proc)
                        seen.add(proc.pid)
                except psutil.Error:
                    pass
            if stop.wait(0.02):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


def settings_for(tmp_path, url):
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    build_mar(store / "noop.mar", "noop")
    return Settings(model_store=store, enable_model_api=True,
                    disable_token_authorization=True, redis_url=url,
                    home=tmp_path / "home", worker_spawn_timeout=60)


@pytest.fixture
def api(tmp_path):
    with redis_server(tmp_path / "redis") as url:
        settings = settings_for(tmp_path, url)
        with api_process(settings, tmp_path / "api") as base:
            yield settings, base


def test_body_fails(api, tmp_path):
    settings, base = api
    home = tmp_path / "h1"
    with supervisor_process(settings, home, "h1"):
        client = ManagementClient(base)
        response = client.register_model_with_params(
            {"url": "noop.mar", "initial_workers": 1, "synchronous": "true"})
        client.close()
        assert response.status == 200, response.body
        [pid] = Home.at(home).live_workers()
        write("worker", psutil.Process(pid))
        assert False, "failing on purpose with a worker running"


@pytest.fixture
def unreachable(api, tmp_path):
    settings = api[0].replace(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with supervisor_process(settings, tmp_path / "h1", "h1", timeout=3) as proc:
        yield proc


def test_supervisor_never_reaches_redis(unreachable):
    raise AssertionError("never runs: the fixture fails")


@pytest.fixture
def unparsable(api, tmp_path):
    settings = api[0].replace(redis_url="redis://127.0.0.1:no-port/0")
    with supervisor_process(settings, tmp_path / "h1", "h1") as proc:
        yield proc


def test_supervisor_url_is_unparsable(unparsable):
    raise AssertionError("never runs: the fixture fails")
'''


def started_since(line: dict[str, object]) -> psutil.Process | None:
    """The recorded process if that very one (same start time) still runs, not a zombie."""
    try:
        proc = psutil.Process(int(str(line["pid"])))
        if abs(proc.create_time() - float(str(line["created"]))) < 0.01:
            return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.Error:
        pass
    return None


def test_failing_tests_leave_no_process_and_no_open_file(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("HYGIENE_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # A ResourceWarning from a finalizer run at the inner interpreter's exit is printed.
    monkeypatch.setenv("PYTHONWARNINGS", "always::ResourceWarning")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider",
        "-W", "error::ResourceWarning",
        "-W", "error::pytest.PytestUnraisableExceptionWarning",
        timeout=150,
    )  # fmt: skip
    output = result.stdout.str() + "\n" + result.stderr.str()
    # The body failed; each start-up failed in its fixture, for the reason meant.
    result.assert_outcomes(failed=1, errors=2)
    assert "failing on purpose with a worker running" in output
    assert "timed out after 3s waiting for supervisor h1" in output
    assert "Port could not be cast to integer value" in output
    assert "ResourceWarning" not in output, output

    lines = [json.loads(line) for line in record.read_text().splitlines()]
    commands = " ".join(str(line["cmdline"]) for line in lines)
    # The record saw what was started: it is what this test checks is gone.
    for started in ("redis-server", "gunicorn", "control.cli supervisor"):
        assert started in commands, commands
    assert [line["kind"] for line in lines].count("worker") == 1
    worker = next(line for line in lines if line["kind"] == "worker")
    assert worker["pid"] in [line["pid"] for line in lines if line["kind"] == "descendant"]
    # Stopped means exited by the time the fixtures returned; a few seconds for reaping.
    wait_for(lambda: not any(map(started_since, lines)), 5, "the recorded processes to exit")
