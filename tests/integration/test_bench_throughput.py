"""``scripts/bench throughput``: wrk parsing, percentiles, Lua, arguments, memory roles, and
end-to-end runs against a fake TorchServe-like server served on 127.0.0.1.

The fake answers the management calls the benchmark makes (register, describe,
unregister) and ``POST /predictions/<model>``: the noop model echoes its JSON body, the
iris model answers species probabilities. Each API checks its own key.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest

from bench import memory
from bench.cli import build_parser, main
from bench.client import BenchError
from bench.load import (
    Target,
    choose_client,
    lua_script,
    lua_string,
    parse_wrk_output,
    parse_wrk_time,
    percentile,
    run_python,
    wrk_duration,
)
from bench.throughput import (
    MemoryReport,
    Plan,
    Point,
    Results,
    check_iris,
    check_noop,
    format_report,
    prepare_iris,
)
from tests.support.json_server import json_server

MANAGEMENT_KEY = "m-key"
INFERENCE_KEY = "i-key"
HEADER = ["model", "workers", "batch", "concurrency", "req/s", "p50", "ms", "p99", "ms", "errors"]

# -- wrk output, as wrk 4.1.0 (Debian) prints it -------------------------------------------

WRK_MS_WITH_ERRORS = """\
Running 5s test @ http://127.0.0.1:8080/predictions/bench-noop
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.46ms    1.21ms  31.02ms   91.35%
    Req/Sec     2.03k   112.40     2.21k    72.00%
  Latency Distribution
     50%    3.21ms
     75%    3.77ms
     90%    4.52ms
     99%   13.23ms
  10117 requests in 5.01s, 1.23MB read
  Non-2xx or 3xx responses: 17
Requests/sec:   2019.36
Transfer/sec:    251.94KB
"""

WRK_MICROSECONDS = """\
Running 1s test @ http://127.0.0.1:39123/ping
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   148.12us   40.03us   1.91ms   96.10%
    Req/Sec     6.53k   301.22     6.81k    81.82%
  Latency Distribution
     50%  140.00us
     75%  151.00us
     90%  170.00us
     99%  355.00us
  6596 requests in 1.00s, 0.91MB read
Requests/sec:   6589.41
Transfer/sec:    0.91MB
"""

WRK_SECONDS_AND_SOCKET_ERRORS = """\
Running 10s test @ http://127.0.0.1:8080/predictions/slow
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02s   210.55ms   1.98s    68.00%
    Req/Sec    31.20     12.04    60.00     70.00%
  Latency Distribution
     50%    1.00s
     75%    1.15s
     90%    1.40s
     99%    1.96s
  301 requests in 10.02s, 48.11KB read
  Socket errors: connect 0, read 2, write 0, timeout 5
  Non-2xx or 3xx responses: 3
Requests/sec:     30.04
Transfer/sec:      4.80KB
"""

WRK_WITHOUT_LATENCY = """\
Running 1s test @ http://127.0.0.1:8080/ping
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   148.12us   40.03us   1.91ms   96.10%
    Req/Sec     6.53k   301.22     6.81k    81.82%
  6596 requests in 1.00s, 0.91MB read
Requests/sec:   6589.41
Transfer/sec:    0.91MB
"""


def test_parse_wrk_milliseconds_and_non_2xx() -> None:
    result = parse_wrk_output(WRK_MS_WITH_ERRORS)
    assert (result.requests, result.requests_per_s) == (10117, 2019.36)
    assert result.seconds == pytest.approx(5.01)
    assert result.p50_ms == pytest.approx(3.21)
    assert result.p99_ms == pytest.approx(13.23)
    assert (result.non_2xx, result.socket_errors) == (17, 0)
    assert result.errors == 17


def test_parse_wrk_microseconds_without_errors() -> None:
    result = parse_wrk_output(WRK_MICROSECONDS)
    assert result.requests_per_s == 6589.41
    assert result.p50_ms == pytest.approx(0.14)
    assert result.p99_ms == pytest.approx(0.355)
    assert (result.requests, result.errors) == (6596, 0)


def test_parse_wrk_seconds_and_socket_errors_count_as_errors() -> None:
    result = parse_wrk_output(WRK_SECONDS_AND_SOCKET_ERRORS)
    assert result.p50_ms == pytest.approx(1000.0)
    assert result.p99_ms == pytest.approx(1960.0)
    assert result.seconds == pytest.approx(10.02)
    assert (result.non_2xx, result.socket_errors, result.errors) == (3, 7, 10)


def test_parse_wrk_needs_the_latency_distribution() -> None:
    with pytest.raises(BenchError, match="unexpected wrk output"):
        parse_wrk_output(WRK_WITHOUT_LATENCY)
    with pytest.raises(BenchError):
        parse_wrk_output("unable to connect to 127.0.0.1:8080 Connection refused\n")


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("812.00us", 0.812),
        ("812.00µs", 0.812),
        ("3.46ms", 3.46),
        ("1.02s", 1020.0),
        ("1.50m", 90_000.0),
        ("2h", 7_200_000.0),
    ],
)
def test_parse_wrk_time_units(text: str, ms: float) -> None:
    assert parse_wrk_time(text) == pytest.approx(ms)


def test_parse_wrk_time_rejects_other_text() -> None:
    with pytest.raises(BenchError):
        parse_wrk_time("3.46 parsecs")


# -- percentiles, Lua, client choice --------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 99) == 99.0
    assert percentile([float(n) for n in range(1, 101)], 100) == 100.0
    assert percentile([float(n) for n in range(1, 1001)], 99) == 990.0
    assert percentile([7.0], 50) == percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0
    with pytest.raises(ValueError):
        percentile([1.0], 0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_lua_string_escapes_quotes_backslashes_and_bytes() -> None:
    assert lua_string('{"a": 1}') == '"{\\"a\\": 1}"'
    assert lua_string("a\\b\nc") == '"a\\\\b\\nc"'
    assert lua_string(b"\x00\xff\t") == '"\\000\\255\\009"'
    assert lua_string("é") == '"\\195\\169"'  # UTF-8 bytes


def test_lua_script_sets_method_body_and_headers() -> None:
    target = Target(
        "http://127.0.0.1:8080/predictions/bench-noop",
        b'{"input": [1, 2, 3]}',
        {"Content-Type": "application/json", "Authorization": "Bearer k"},
    )
    lines = lua_script(target).splitlines()
    assert lines[0].startswith("--")
    assert lines[1:] == [
        'wrk.method = "POST"',
        'wrk.body = "{\\"input\\": [1, 2, 3]}"',
        'wrk.headers["Content-Type"] = "application/json"',
        'wrk.headers["Authorization"] = "Bearer k"',
    ]


def test_wrk_duration_is_whole_seconds() -> None:
    assert [wrk_duration(s) for s in (0.5, 1.0, 5.0, 5.2)] == [1, 1, 5, 6]


def test_choose_client() -> None:
    assert choose_client(None, "/usr/bin/wrk") == "wrk"
    assert choose_client(None, None) == "python"
    assert choose_client("python", "/usr/bin/wrk") == "python"
    assert choose_client("wrk", "/usr/bin/wrk") == "wrk"
    with pytest.raises(BenchError, match="wrk is not on PATH"):
        choose_client("wrk", None)


def test_answer_checks() -> None:
    assert check_noop(b'{"input": [1, 2, 3]}') is None
    assert check_noop(b'{"input": [1, 2]}') is not None
    assert check_noop(b"not json") is not None
    assert check_iris(b'{"setosa": 0.99, "versicolor": 0.01, "virginica": 0.0}') is None
    assert check_iris(b'{"virginica": 0.9, "setosa": 0.1}') is not None
    assert check_iris(b"[1, 2]") is not None


# -- arguments ------------------------------------------------------------------------------


def test_throughput_defaults() -> None:
    args = build_parser().parse_args(["throughput", "--model-store", "/s"])
    assert args.inference == "http://127.0.0.1:8080"
    assert args.management == "http://127.0.0.1:8081"
    assert args.model_store == Path("/s")
    assert args.duration == 5.0
    assert args.concurrency == [1, 8, 32]
    assert args.workers == [1, 2]
    assert args.batch_sizes == [1, 8]
    assert args.max_batch_delay == 5
    assert args.models == ["noop", "iris"]
    assert (args.client, args.server_pid, args.iris_mar, args.json) == (None, None, None, False)
    assert (args.token, args.key_file) == (None, None)


def test_throughput_arguments() -> None:
    args = build_parser().parse_args(
        [
            "throughput", "--inference", "http://h:1", "--management", "http://h:2",
            "--model-store", "/s", "--key-file", "/k.json", "--duration", "0.5",
            "--concurrency", "2,16", "--workers", "3", "--batch-sizes", "1,4,8",
            "--max-batch-delay", "0", "--models", "iris", "--iris-mar", "/i.mar",
            "--server-pid", "42", "--client", "python", "--json",
        ]
    )  # fmt: skip
    assert (args.inference, args.management, args.key_file) == (
        "http://h:1",
        "http://h:2",
        Path("/k.json"),
    )
    assert (args.duration, args.concurrency, args.workers) == (0.5, [2, 16], [3])
    assert (args.batch_sizes, args.max_batch_delay, args.models) == ([1, 4, 8], 0, ["iris"])
    assert (args.iris_mar, args.server_pid, args.client, args.json) == (
        Path("/i.mar"),
        42,
        "python",
        True,
    )


@pytest.mark.parametrize(
    "bad",
    [
        ["--concurrency", "1,x"],
        ["--concurrency", "0"],
        ["--workers", ""],
        ["--duration", "0"],
        ["--duration", "soon"],
        ["--max-batch-delay", "-1"],
        ["--models", "noop,resnet"],
        ["--client", "curl"],
        ["--token", "a", "--key-file", "k.json"],
    ],
)
def test_throughput_rejects_bad_arguments(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["throughput", "--model-store", "/s", *bad])
    assert exc.value.code == 2


def test_lifecycle_is_still_there() -> None:
    args = build_parser().parse_args(["lifecycle", "--model-store", "/s"])
    assert (args.command, args.runs) == ("lifecycle", 5)


# -- memory roles ---------------------------------------------------------------------------


def _proc(pid: int, ppid: int, name: str, cmd: str, rss_mib: float) -> memory.ProcessInfo:
    rss = int(rss_mib * memory.MIB)
    return memory.ProcessInfo(pid, ppid, name, tuple(cmd.split()), rss, rss // 2)


def test_mqserve_tree_roles() -> None:
    py = "/v/bin/python"
    gunicorn = f"{py} -m gunicorn control.server:inference_app() --bind 127.0.0.1:8080"
    supervisor = f"{py} -m control.cli supervisor --settings-file s.json --host-name h"
    tree = [
        _proc(100, 1, "mqserve", f"{py} /v/bin/mqserve start --foreground", 50),
        _proc(101, 100, "redis-server", "redis-server *:0", 10),
        _proc(102, 100, "python", gunicorn, 40),
        _proc(103, 102, "python", gunicorn, 45),
        _proc(104, 102, "python", gunicorn, 45),
        _proc(105, 100, "python", gunicorn.replace("inference", "management"), 40),
        _proc(106, 105, "python", gunicorn.replace("inference", "management"), 44),
        _proc(107, 100, "python", supervisor, 60),
        _proc(108, 107, "python", supervisor, 80),  # forked worker: supervisor's cmdline
        _proc(109, 107, "python", f"{py} -m workers.worker.process --wid w2 --model m", 120),
    ]
    roles = memory.classify(tree, 100)
    assert roles == {
        100: "mqserve runner",
        101: "redis-server",
        102: "gunicorn master (inference)",
        103: "gunicorn worker (inference)",
        104: "gunicorn worker (inference)",
        105: "gunicorn master (management)",
        106: "gunicorn worker (management)",
        107: "supervisor",
        108: "worker",
        109: "worker",
    }
    grouped = {g.role: g for g in memory.group(tree, 100)}
    assert grouped["gunicorn worker (inference)"].processes == 2
    assert grouped["gunicorn worker (inference)"].rss_mib == pytest.approx(90.0)
    assert grouped["gunicorn worker (inference)"].pss_mib == pytest.approx(45.0)
    assert grouped["worker"].processes == 2
    assert [w.pid for w in memory.workers(tree, 100)] == [108, 109]


def test_torchserve_tree_roles() -> None:
    java = "java -Dmodel_server_home=/ts -cp .:/ts/frontend/* org.pytorch.serve.ModelServer"
    worker = "/ts/bin/python /ts/ts/model_service_worker.py --sock-type unix --sock-name /t/s.9000"
    tree = [
        _proc(200, 1, "java", java, 400),
        _proc(201, 200, "python", worker, 211),
        _proc(202, 200, "python", worker, 212),
    ]
    assert memory.classify(tree, 200) == {200: "java", 201: "python worker", 202: "python worker"}
    assert [w.pid for w in memory.workers(tree, 200)] == [201, 202]
    unreadable = [memory.ProcessInfo(200, 1, "java", (java,), 1024, None)]
    assert memory.group(unreadable, 200)[0].pss_mib is None


def test_snapshot_of_missing_process() -> None:
    with pytest.raises(BenchError, match="cannot inspect"):
        memory.snapshot(2**22 + 12345)


# -- the fake server ------------------------------------------------------------------------


class FakeServer:
    """A TorchServe-like management and inference API in one process (one port)."""

    IRIS_ANSWER: ClassVar[dict[str, float]] = {
        "setosa": 0.9999,
        "versicolor": 7.8e-05,
        "virginica": 3.1e-08,
    }

    def __init__(self, store: Path) -> None:
        self.store = store
        self.models: dict[str, int] = {}
        self.registrations: list[dict[str, str]] = []
        self.predictions = 0
        self.noop_answer: bytes | None = None  # None: echo the body
        self.keys = (MANAGEMENT_KEY, INFERENCE_KEY)
        self.lock = threading.Lock()

    def answer(self, method: str, target: str, auth: str | None, body: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        params = {key: values[0] for key, values in parse_qs(parts.query).items()}
        with self.lock:
            if parts.path.startswith("/predictions/"):
                if auth != f"Bearer {self.keys[1]}":
                    return 401, {"code": 401, "message": "Token Authorization failed."}
                return self._predict(parts.path.removeprefix("/predictions/"), body)
            if auth != f"Bearer {self.keys[0]}":
                return 401, {"code": 401, "message": "Token Authorization failed."}
            if method == "POST" and parts.path == "/models":
                assert (self.store / params["url"]).is_file()
                self.registrations.append(params)
                self.models[params["model_name"]] = int(params["initial_workers"])
                return 200, {"status": f"Model {params['model_name']} registered"}
            name = parts.path.removeprefix("/models/")
            if name not in self.models:
                return 404, {"code": 404, "message": f"Model not found: {name}"}
            if method == "GET":
                workers = [{"id": str(9000 + i)} for i in range(self.models[name])]
                return 200, [{"modelName": name, "workers": workers}]
            if method == "DELETE":
                del self.models[name]
                return 200, {"status": f'Model "{name}" unregistered'}
            return 405, {"code": 405}

    def _predict(self, name: str, body: bytes) -> tuple[int, Any]:
        if name == "broken":
            return 503, {"code": 503, "message": "no worker"}
        if name not in self.models:
            return 404, {"code": 404, "message": f"Model not found: {name}"}
        self.predictions += 1
        if name == "bench-iris":
            assert json.loads(body) == [5.1, 3.5, 1.4, 0.2]
            return 200, self.IRIS_ANSWER
        if self.noop_answer is not None:
            return 200, json.loads(self.noop_answer)
        return 200, json.loads(body)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def fake(store: Path) -> Iterator[tuple[FakeServer, str]]:
    state = FakeServer(store)

    with json_server(state.answer, keep_alive=True) as url:  # keep-alive, like TorchServe
        yield state, url


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key_file.json"
    path.write_text(
        json.dumps(
            {
                "management": {"key": MANAGEMENT_KEY, "expiration time": "2099-01-01T00:00:00Z"},
                "inference": {"key": INFERENCE_KEY, "expiration time": "2099-01-01T00:00:00Z"},
                "API": {"key": "unused"},
            }
        )
    )
    return path


def bench(url: str, store: Path, *extra: str) -> int:
    return main(
        ["throughput", "--inference", url, "--management", url, "--model-store", str(store), *extra]
    )


def _rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == HEADER)
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


# -- end to end -----------------------------------------------------------------------------


def test_python_client_table(
    fake: tuple[FakeServer, str],
    store: Path,
    key_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state, url = fake
    iris = tmp_path / "iris.mar"
    iris.write_bytes(b"PK fake archive")
    code = bench(
        url, store, "--key-file", str(key_file), "--client", "python", "--duration", "0.5",
        "--concurrency", "1,3", "--workers", "2", "--batch-sizes", "8",
        "--max-batch-delay", "7", "--models", "noop,iris", "--iris-mar", str(iris),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = _rows(captured.out)
    assert [row[:4] for row in rows] == [
        ["noop", "2", "8", "1"],
        ["noop", "2", "8", "3"],
        ["iris", "2", "8", "1"],
        ["iris", "2", "8", "3"],
    ]
    for row in rows:
        rate, p50, p99, errors = float(row[4]), float(row[5]), float(row[6]), int(row[7])
        assert rate > 0 and 0 < p50 <= p99 and errors == 0
    assert "Python threads, 0.5 s per point, max_batch_delay 7 ms" in captured.out
    assert "scripts/bench throughput --inference" in captured.out.splitlines()[-1]
    assert [(r["model_name"], r["url"]) for r in state.registrations] == [
        ("bench-noop", "bench-noop.mar"),
        ("bench-iris", "bench-iris.mar"),
    ]
    for params in state.registrations:
        assert params["initial_workers"] == "2"
        assert params["batch_size"] == "8"
        assert params["max_batch_delay"] == "7"
        assert params["synchronous"] == "true"
    assert state.models == {}  # unregistered again
    assert sorted(p.name for p in store.iterdir()) == []  # archives removed
    assert iris.is_file()  # the source archive is only copied


def test_json_output_with_memory(
    fake: tuple[FakeServer, str], store: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _state, url = fake
    code = bench(
        url, store, "--key-file", str(key_file), "--client", "python",
        "--duration", "0.5", "--concurrency", "2", "--workers", "1,2", "--batch-sizes", "1",
        "--models", "noop", "--server-pid", str(os.getpid()), "--json",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)  # JSON only on stdout
    assert report["benchmark"] == "throughput"
    assert report["client"] == "python"
    assert [(p["workers"], p["concurrency"], p["errors"]) for p in report["points"]] == [
        (1, 2, 0),
        (2, 2, 0),
    ]
    assert all(p["requests_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0 for p in report["points"])
    assert [m["workers"] for m in report["memory"]] == [1, 2]
    for entry in report["memory"]:
        assert entry["roles"][0]["processes"] >= 1 and entry["roles"][0]["rss_mib"] > 0
        assert entry["total"]["rss_mib"] == pytest.approx(
            sum(role["rss_mib"] for role in entry["roles"])
        )
        assert entry["idle_worker"] is None  # the fake has no worker processes
    assert "scripts/bench throughput" in captured.err


def test_token_goes_to_both_apis(
    fake: tuple[FakeServer, str], store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = fake
    args = ("--client", "python", "--duration", "0.1", "--concurrency", "1", "--workers", "1",
            "--batch-sizes", "1", "--models", "noop")  # fmt: skip
    # The fake wants a different key for each API: one token passes only management.
    assert bench(url, store, "--token", MANAGEMENT_KEY, *args) == 1
    assert "warm-up" in capsys.readouterr().err
    assert state.models == {}
    state.keys = ("shared", "shared")
    assert bench(url, store, "--token", "shared", *args) == 0
    assert len(_rows(capsys.readouterr().out)) == 1


def test_warm_up_checks_the_answer_and_cleans_up(
    fake: tuple[FakeServer, str],
    store: Path,
    key_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state, url = fake
    state.noop_answer = b'{"something": "else"}'
    code = bench(
        url, store, "--key-file", str(key_file), "--client", "python", "--duration", "0.1",
        "--concurrency", "1", "--workers", "1", "--batch-sizes", "1", "--models", "noop",
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "warm-up" in err and "expected the request echoed" in err
    assert state.models == {}
    assert list(store.iterdir()) == []


def test_leftover_model_is_unregistered_first(
    fake: tuple[FakeServer, str], store: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = fake
    state.models["bench-noop"] = 3
    code = bench(
        url, store, "--key-file", str(key_file), "--client", "python", "--duration", "0.1",
        "--concurrency", "1", "--workers", "1", "--batch-sizes", "1", "--models", "noop",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "left over from an earlier run" in captured.err
    assert len(_rows(captured.out)) == 1


def test_python_client_counts_non_2xx(fake: tuple[FakeServer, str]) -> None:
    _state, url = fake
    target = Target(
        f"{url}/predictions/broken", b"{}", {"Authorization": f"Bearer {INFERENCE_KEY}"}
    )
    result = run_python(target, 2, 0.2)
    assert result.requests > 0
    assert result.non_2xx == result.requests == result.errors
    assert result.socket_errors == 0


def test_python_client_counts_refused_connections() -> None:
    import socket

    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run_python(Target(f"http://127.0.0.1:{port}/predictions/x", b"{}"), 1, 0.1)
    assert result.socket_errors > 0 and result.errors == result.socket_errors
    assert result.requests_per_s == 0.0


def test_explicit_iris_archive_must_exist(store: Path, tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="no iris archive"):
        prepare_iris(store, tmp_path / "missing.mar", lambda _line: None)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_client_table(
    fake: tuple[FakeServer, str], store: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, url = fake
    code = bench(
        url, store, "--key-file", str(key_file), "--client", "wrk", "--duration", "1",
        "--concurrency", "2", "--workers", "1", "--batch-sizes", "1", "--models", "noop",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (row,) = _rows(captured.out)
    assert row[:4] == ["noop", "1", "1", "2"]
    assert float(row[4]) > 0 and int(row[7]) == 0
    assert "wrk -t1, 1 s per point" in captured.out
    assert state.predictions > 5  # more than the warm-up: wrk sent the body and key


def test_report_has_memory_table_total_and_idle_worker() -> None:
    plan = Plan(["noop"], [2], [1], [8], 5.0, 5, "wrk", server_pid=100)
    point = Point("noop", 2, 1, 8, parse_wrk_output(WRK_MS_WITH_ERRORS))
    roles = (
        memory.RoleMemory("supervisor", 1, 47.3, 30.9),
        memory.RoleMemory("worker", 2, 111.1, 84.0),
    )
    idle = _proc(108, 107, "python", "python -m workers.worker.process", 55.0)
    results = Results([point], [MemoryReport("noop", 2, 1, roles, idle)])
    lines = format_report(results, plan, "http://127.0.0.1:8080").splitlines()
    assert "wrk -t1, 5 s per point, max_batch_delay 5 ms" in lines[0]
    assert lines[1].split() == HEADER
    assert lines[2].split() == ["noop", "2", "1", "8", "2019.4", "3.21", "13.23", "17"]
    table = lines[lines.index("") + 2 :]
    assert table[0].split() == ["model", "workers", "batch", "role", "procs", "RSS", "MiB", "PSS",
                                "MiB"]  # fmt: skip
    assert table[2].split() == ["noop", "2", "1", "worker", "2", "111.1", "84.0"]
    assert table[3].split() == ["noop", "2", "1", "total", "3", "158.4", "114.9"]
    assert (
        lines[-1] == "idle worker (noop, 2 workers, batch 1): pid 108, RSS 55.0 MiB, PSS 27.5 MiB"
    )
