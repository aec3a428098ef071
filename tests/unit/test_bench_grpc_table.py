"""``scripts/bench grpc``'s pure parts: load results and their percentiles, the stream
check, the handler it writes, the gRPC port from a config, samples, the table, the
markdown, the JSON and the arguments. No processes, no network."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest

from bench import grpc_bench, servers
from bench.cli import build_parser
from bench.client import BenchError
from bench.grpc_bench import (
    GrpcPlan,
    Report,
    Row,
    Samples,
    as_dict,
    build_rows,
    check_stream,
    format_markdown,
    format_table,
    grpc_port,
    load_result,
    measures,
    noop_request,
    prepare_store,
    stream_handler,
)
from bench.throughput import NOOP_PAYLOAD, check_noop

MEASURES = measures(8, 3, 50)


def filled_samples() -> Samples:
    samples = Samples(tuple(m.key for m in MEASURES))
    figures = {
        "noop_rps": (2400.0, 900.0),
        "noop_p50": (3.1, 8.4),
        "noop_p99": (9.7, 15.2),
        "stream_first_ms": (4.2, 5.1),
        "stream_total_ms": (158.0, 161.5),
    }
    for key, (http, grpc) in figures.items():
        samples.add(key, "http", http)
        samples.add(key, "grpc", grpc)
    return samples


# -- load results ----------------------------------------------------------------------------


def test_load_result_takes_nearest_rank_percentiles_and_rate() -> None:
    latencies = [float(v) for v in range(1, 101)]  # 1..100 ms
    result = load_result(latencies, failed=3, seconds=2.0)
    assert result.requests == 103  # failed calls are requests too
    assert result.requests_per_s == 50.0  # only answered calls count towards the rate
    assert (result.p50_ms, result.p99_ms) == (50.0, 99.0)
    assert (result.socket_errors, result.non_2xx, result.errors) == (3, 0, 3)


def test_load_result_of_a_single_call_and_of_none() -> None:
    one = load_result([7.5], failed=0, seconds=1.0)
    assert (one.p50_ms, one.p99_ms, one.requests_per_s) == (7.5, 7.5, 1.0)
    none = load_result([], failed=4, seconds=0.0)  # no division by zero
    assert (none.requests, none.requests_per_s, none.p50_ms, none.errors) == (4, 0.0, 0.0, 4)


def test_p99_sees_the_slow_tail() -> None:
    latencies = [1.0] * 98 + [40.0, 50.0]
    result = load_result(latencies, failed=0, seconds=1.0)
    assert result.p50_ms == 1.0
    assert result.p99_ms == 40.0


# -- streams and requests ------------------------------------------------------------------


def test_a_complete_stream_passes_both_checks() -> None:
    assert check_stream([b"tok", b"tok", b"tok", b"done"], 3) is None
    # HTTP reads may split or join chunks: only the concatenation counts there.
    assert check_stream([b"to", b"ktok", b"tokdone"], 3, framed=False) is None


@pytest.mark.parametrize(
    ("pieces", "framed"),
    [
        ([b"tok", b"tok", b"done"], True),  # a piece missing
        ([b"tok", b"tok", b"tok"], True),  # no final message
        ([b"tok", b"tok", b"tok", b"done", b"tok"], True),  # something after the end
        ([b"toktok", b"tok", b"done"], True),  # two pieces in one message
        ([b"toktokdone"], False),
        ([b'{"code": 503}'], False),
    ],
)
def test_an_incomplete_or_wrong_stream_is_named(pieces: list[bytes], framed: bool) -> None:
    problem = check_stream(pieces, 3, framed=framed)
    assert problem is not None and "expected" in problem


def test_the_grpc_noop_request_carries_the_http_body_as_its_body_part() -> None:
    request = noop_request("m")
    assert request.model_name == "m" and request.model_version == ""
    assert dict(request.input) == {"body": json.dumps(NOOP_PAYLOAD).encode()}
    # The noop handler echoes the body part: the echo is what check_noop accepts.
    assert check_noop(request.input["body"]) is None


def run_handler(source: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], Any, list[float]]:
    """Run a handler source with a recording ``send_intermediate_predict_response`` and
    ``time.sleep``; (pieces sent, return value, sleeps)."""
    sent: list[Any] = []
    sleeps: list[float] = []
    utils = types.ModuleType("ts.handler_utils.utils")
    utils.send_intermediate_predict_response = (  # type: ignore[attr-defined]
        lambda ret, ids, message, code, context: sent.append((ret, ids, code))
    )
    monkeypatch.setitem(sys.modules, "ts.handler_utils.utils", utils)
    namespace: dict[str, Any] = {}
    exec(compile(source, "handler.py", "exec"), namespace)  # our own handler source
    namespace["time"] = types.SimpleNamespace(sleep=sleeps.append)
    context = types.SimpleNamespace(request_ids={0: "rid"})
    assert namespace["handle"](None, context) is None  # initialisation
    result = namespace["handle"]([{"body": b"{}"}], context)
    return sent, result, sleeps


def test_the_streaming_handler_sends_its_pieces_then_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent, result, sleeps = run_handler(stream_handler(4, 25), monkeypatch)
    assert sent == [(["tok"], {0: "rid"}, 200)] * 4
    assert result == ["done"]
    assert sleeps == [0.025] * 4


def test_the_store_holds_both_archives(tmp_path: Path) -> None:
    store = prepare_store(tmp_path, 2, 10)
    assert sorted(p.name for p in store.iterdir()) == ["bench-noop.mar", "bench-stream.mar"]
    with zipfile.ZipFile(store / "bench-stream.mar") as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        handler = mar.read(manifest["model"]["handler"]).decode()
    assert manifest["model"]["modelName"] == "bench-stream"
    assert handler == stream_handler(2, 10)
    assert "range(2)" in handler and "time.sleep(0.01)" in handler


# -- the server's gRPC port ----------------------------------------------------------------


def test_the_grpc_port_comes_from_the_config_bench_writes(tmp_path: Path) -> None:
    ports = {
        "inference": 1,
        "management": 2,
        "metrics": 3,
        "grpc_inference": 4567,
        "grpc_management": 5,
    }
    assert grpc_port(servers.config_properties(ports, tmp_path)) == 4567


@pytest.mark.parametrize("text", ["", "grpc_management_port=7071\n", "grpc_inference_port=x\n"])
def test_a_config_without_a_grpc_port_is_an_error(text: str) -> None:
    with pytest.raises(BenchError, match="grpc_inference_port"):
        grpc_port(text)


# -- samples and the table -----------------------------------------------------------------


def test_samples_reject_unknown_measures_and_protocols() -> None:
    samples = Samples(("noop_rps",))
    with pytest.raises(KeyError):
        samples.add("nope", "http", 1.0)
    with pytest.raises(KeyError):
        samples.add("noop_rps", "websocket", 1.0)


def test_rows_are_medians_and_missing_figures_are_none() -> None:
    samples = Samples(tuple(m.key for m in MEASURES))
    for value in (10.0, 30.0, 20.0):
        samples.add("noop_rps", "http", value)
    rows = build_rows(MEASURES, samples)
    assert [row.measure for row in rows] == list(MEASURES)
    assert (rows[0].http, rows[0].grpc) == (20.0, None)
    assert all(row.http is None and row.grpc is None for row in rows[1:])


def test_measures_name_their_settings() -> None:
    labels = [m.label for m in measures(16, 5, 20)]
    assert labels[0] == "noop, 2 workers, C=16: requests/s"
    assert labels[3] == "streaming, 5 pieces 20 ms apart: first chunk"
    assert [m.unit for m in measures(16, 5, 20)] == ["req/s", "ms", "ms", "ms", "ms"]


def test_the_table_has_one_line_per_measure_then_the_notes() -> None:
    rows = build_rows(MEASURES, filled_samples())
    text = format_table(rows, ["gRPC is client-bound"])
    lines = text.splitlines()
    assert lines[0].split() == ["measure", "HTTP", "gRPC"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    body = lines[2:7]
    assert body[0].startswith("noop, 2 workers, C=8: requests/s")
    assert body[0].split()[-4:] == ["2,400", "req/s", "900", "req/s"]
    assert body[1].split()[-4:] == ["3.10", "ms", "8.40", "ms"]
    assert body[4].startswith("streaming, 3 pieces 50 ms apart: whole answer")
    assert body[4].split()[-4:] == ["158.00", "ms", "161.50", "ms"]
    assert lines[7:] == ["note: gRPC is client-bound"]
    # Figures are right-aligned in their columns.
    assert len({len(line) for line in body}) == 1


def test_a_missing_figure_is_a_dash() -> None:
    rows = [Row(MEASURES[0], 12.0, None)]
    assert format_table(rows).splitlines()[2].split()[-3:] == ["12", "req/s", "-"]


def test_markdown_lists_the_machine_the_table_and_every_sample() -> None:
    samples = filled_samples()
    samples.add("noop_rps", "grpc", 1100.0)
    samples.notes.append("HTTP, noop load: 2 errors")
    text = format_markdown(build_rows(MEASURES, samples), [("CPU", "x86, 2 cores")], samples)
    assert "| CPU | x86, 2 cores |" in text
    assert "| measure | HTTP | gRPC |\n|---|---:|---:|" in text
    assert "| noop, 2 workers, C=8: requests/s | 2,400 req/s | 1,000 req/s |" in text
    assert "* noop, 2 workers, C=8: requests/s, gRPC: 900 req/s, 1,100 req/s" in text
    assert "* streaming, 3 pieces 50 ms apart: first chunk, HTTP: 4.20 ms" in text
    assert text.rstrip().endswith("Note: HTTP, noop load: 2 errors")


def test_json_has_each_protocols_median_and_the_samples() -> None:
    samples = filled_samples()
    report = Report(build_rows(MEASURES, samples), samples, [("date", "today")])
    data = json.loads(json.dumps(as_dict(report)))
    assert data["machine"] == {"date": "today"}
    assert [row["key"] for row in data["rows"]] == [m.key for m in MEASURES]
    assert data["rows"][0] == {
        "key": "noop_rps",
        "measure": "noop, 2 workers, C=8: requests/s",
        "unit": "req/s",
        "http": 2400.0,
        "grpc": 900.0,
    }
    assert data["samples"]["stream_total_ms"] == {"http": [158.0], "grpc": [161.5]}


# -- arguments ------------------------------------------------------------------------------


def test_grpc_arguments_and_their_defaults() -> None:
    args = build_parser().parse_args(["grpc"])
    assert (args.duration, args.concurrency, args.calls) == (5.0, 8, 10)
    assert (args.pieces, args.piece_delay, args.rounds) == (3, 50, 1)
    assert args.state_dir == grpc_bench.DEFAULT_STATE_DIR != servers.DEFAULT_STATE_DIR
    assert (args.markdown, args.json, args.client) == (None, False, None)
    args = build_parser().parse_args(
        ["grpc", "--duration", "1", "--concurrency", "4", "--piece-delay", "0", "--json"]
    )
    assert (args.duration, args.concurrency, args.piece_delay, args.json) == (1.0, 4, 0, True)


@pytest.mark.parametrize(
    "argv",
    [
        ["grpc", "--duration", "0"],
        ["grpc", "--concurrency", "0"],
        ["grpc", "--calls", "-1"],
        ["grpc", "--pieces", "0"],
        ["grpc", "--piece-delay", "-5"],
        ["grpc", "--client", "curl"],
    ],
)
def test_bad_grpc_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (GrpcPlan(rounds=0), "rounds must be at least 1"),
        (GrpcPlan(calls=0), "calls must be at least 1"),
        (GrpcPlan(delay_ms=-1), "must not be negative"),
    ],
)
def test_a_bad_plan_is_refused_before_anything_starts(
    plan: GrpcPlan, message: str, tmp_path: Path
) -> None:
    plan = dataclasses.replace(plan, state_dir=tmp_path / "state")
    with pytest.raises(BenchError, match=message):
        grpc_bench.run_grpc_bench(plan)
    assert not (tmp_path / "state").exists()  # nothing written, nothing started
