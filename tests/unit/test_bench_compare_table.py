"""``scripts/bench compare``'s pure parts: ABBA order, ratios and goals, the tables, wrk
reports into samples, the configs both servers get, and the arguments. No processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import compare, servers
from bench.cli import build_parser, run_compare
from bench.compare import Goal, Row, Samples, abba, build_rows, format_markdown, format_table
from bench.load import parse_wrk_output
from bench.slow import SLOW_PREFIX, header_bytes

WRK_C32 = """\
Running 5s test @ http://127.0.0.1:8080/predictions/bench-noop2
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.46ms    6.21ms  98.02ms   85.35%
    Req/Sec     2.61k   212.40     2.91k    72.00%
  Latency Distribution
     50%   11.09ms
     75%   13.77ms
     90%   18.52ms
     99%   29.52ms
  13030 requests in 5.00s, 1.53MB read
  Non-2xx or 3xx responses: 4
Requests/sec:   2606.00
Transfer/sec:    313.94KB
"""


def measure(key: str) -> compare.Measure:
    (found,) = [m for m in compare.MEASURES if m.key == key]
    return found


# -- order ----------------------------------------------------------------------------------


def test_abba_alternates_the_first_server_every_round() -> None:
    names = ["torchserve", "mqserve"]
    assert abba(names, 0) == ["torchserve", "mqserve", "mqserve", "torchserve"]
    assert abba(names, 1) == ["mqserve", "torchserve", "torchserve", "mqserve"]
    assert abba(names, 2) == abba(names, 0)
    assert abba(["mqserve"], 3) == ["mqserve"]
    with pytest.raises(ValueError):
        abba(["a", "b", "c"], 0)


# -- ratios and goals -----------------------------------------------------------------------


def test_ratio_is_mqserve_over_torchserve() -> None:
    assert compare.ratio(1000.0, 2500.0) == 2.5
    assert compare.ratio(None, 2500.0) is None
    assert compare.ratio(1000.0, None) is None
    assert compare.ratio(0.0, 1.0) is None


@pytest.mark.parametrize(
    ("goal", "torchserve", "mqserve", "met"),
    [
        (Goal("ratio>=", 2.0), 1000.0, 2000.0, True),
        (Goal("ratio>=", 2.0), 1000.0, 1999.0, False),
        (Goal("ratio<=", 0.5), 50.0, 25.0, True),
        (Goal("ratio<=", 0.5), 50.0, 26.0, False),
        (Goal("ratio<=", 0.5), None, 26.0, None),
        (Goal("max", 20.0), None, 19.9, True),
        (Goal("max", 20.0), 1.0, 20.1, False),
        (Goal("max", 20.0), 1.0, None, None),
    ],
)
def test_goal_met(goal: Goal, torchserve: float | None, mqserve: float | None, met: bool) -> None:
    assert goal.met(torchserve, mqserve) is met


def test_goal_text_plain_and_fancy() -> None:
    assert Goal("ratio>=", 2.0).text("req/s") == ">= 2.0x"
    assert Goal("ratio<=", 0.5).text("ms", fancy=True) == "\u2264 0.5\u00d7"
    assert Goal("max", 20.0).text("ms") == "<= 20 ms"


def test_the_goals_are_the_issue_targets() -> None:
    goals = {m.key: (m.goal.kind, m.goal.value) for m in compare.MEASURES}
    assert goals == {
        "noop2_rps": ("ratio>=", 2.0),
        "noop2_p99": ("ratio<=", 0.5),
        "noop1_p50": ("ratio<=", 0.8),
        "batch_rps": ("ratio>=", 1.5),
        "describe_rps": ("ratio>=", 1.0),
        "slow_predict_ms": ("max", 20.0),
        "slow_describe_ms": ("max", 20.0),
        "register_s": ("ratio<=", 0.3),
        "scale_s": ("ratio<=", 0.3),
        "worker_rss_mib": ("ratio<=", 0.3),
    }


# -- samples --------------------------------------------------------------------------------


def test_samples_take_medians_and_refuse_unknown_measures() -> None:
    samples = Samples()
    for value in (3.0, 1.0, 2.0):
        samples.add("register_s", "mqserve", value)
    samples.add("register_s", "torchserve", 10.0)
    samples.add("register_s", "torchserve", 12.0)
    assert samples.median("register_s", "mqserve") == 2.0
    assert samples.median("register_s", "torchserve") == 11.0
    assert samples.median("scale_s", "mqserve") is None
    assert samples.of("register_s", "mqserve") == [3.0, 1.0, 2.0]
    with pytest.raises(KeyError):
        samples.add("nonsense", "mqserve", 1.0)


def test_a_wrk_report_becomes_samples_and_its_errors_a_note() -> None:
    samples = Samples()
    result = parse_wrk_output(WRK_C32)
    compare.add_load(
        samples, "torchserve", {"noop2_rps": "requests_per_s", "noop2_p99": "p99_ms"}, result,
        "noop, 2 workers, C=32",
    )  # fmt: skip
    assert samples.of("noop2_rps", "torchserve") == [2606.0]
    assert samples.of("noop2_p99", "torchserve") == [pytest.approx(29.52)]
    assert samples.notes == [
        "TorchServe, noop, 2 workers, C=32: 4 errors in 13030 requests (4 non-2xx, 0 failed)"
    ]
    compare.add_load(samples, "mqserve", {"noop1_p50": "p50_ms"}, result, "noop, 1 worker, C=1")
    assert samples.of("noop1_p50", "mqserve") == [pytest.approx(11.09)]


# -- tables ---------------------------------------------------------------------------------


def full_samples() -> Samples:
    samples = Samples()
    figures = {
        "noop2_rps": (1000.0, 2500.0),
        "noop2_p99": (50.0, 20.0),
        "noop1_p50": (1.0, 0.9),
        "batch_rps": (2000.0, 3100.0),
        "describe_rps": (10000.0, 9000.0),
        "slow_predict_ms": (2.0, 3.0),
        "slow_describe_ms": (2.0, 25.0),
        "register_s": (1.5, 0.3),
        "scale_s": (2.5, 0.45),
        "worker_rss_mib": (210.0, 52.5),
    }
    for key, (ts, mq) in figures.items():
        samples.add(key, "torchserve", ts)
        samples.add(key, "mqserve", mq)
    return samples


def table_cells(text: str) -> dict[str, list[str]]:
    """Plain table rows by label; columns are separated by two or more spaces."""
    out = {}
    for line in text.splitlines()[2:]:
        if line.startswith("note:"):
            continue
        cells = [c for c in line.split("  ") if c.strip()]
        out[cells[0].strip()] = [c.strip() for c in cells[1:]]
    return out


def test_plain_table_has_both_figures_the_ratio_target_and_verdict() -> None:
    text = format_table(build_rows(full_samples()), ["TorchServe, x: 1 errors"])
    lines = text.splitlines()
    assert lines[0].split() == ["measure", "TorchServe", "mqserve", "ratio", "target", "met?"]
    rows = table_cells(text)
    assert rows["noop, 2 workers, C=32: requests/s"] == [
        "1,000 req/s", "2,500 req/s", "2.50x", ">= 2.0x", "yes",
    ]  # fmt: skip
    assert rows["noop, 2 workers, C=32: p99"] == ["50.00 ms", "20.00 ms", "0.40x", "<= 0.5x", "yes"]
    assert rows["noop, 1 worker, C=1: p50"][2:] == ["0.90x", "<= 0.8x", "no"]
    assert rows["describe (GET /models/<model>), C=8: requests/s"][-1] == "no"
    slow = rows["50 slow clients, management port: a describe"]
    assert slow[1:] == ["25.00 ms", "12.50x", "<= 20 ms", "no"]
    assert rows["sync register, 1 worker"][:3] == ["1.500 s", "0.300 s", "0.20x"]
    assert rows["idle worker RSS"][:3] == ["210.0 MiB", "52.5 MiB", "0.25x"]
    assert len(rows) == len(compare.MEASURES)
    assert lines[-1] == "note: TorchServe, x: 1 errors"


def test_one_server_only_has_no_ratios_but_absolute_goals() -> None:
    samples = Samples()
    samples.add("slow_predict_ms", "mqserve", 3.0)
    samples.add("noop2_rps", "mqserve", 2500.0)
    rows = table_cells(format_table(build_rows(samples)))
    assert rows["noop, 2 workers, C=32: requests/s"] == ["-", "2,500 req/s", "-", ">= 2.0x", "-"]
    assert rows["50 slow clients, inference port: a prediction"] == [
        "-",
        "3.00 ms",
        "-",
        "<= 20 ms",
        "yes",
    ]
    assert rows["sync scale 1->4"] == ["-", "-", "-", "<= 0.3x", "-"]


def test_markdown_has_the_machine_the_table_and_every_sample() -> None:
    samples = full_samples()
    samples.add("register_s", "mqserve", 0.5)
    samples.notes.append("mqserve closed 3 slow connections")
    machine = [("date", "2026-12-01 17:00 UTC"), ("CPU", "Xeon, 2 cores (2 usable)")]
    text = format_markdown(build_rows(samples), machine, samples)
    lines = text.splitlines()
    assert lines[:4] == [
        "| what | |", "|---|---|", "| date | 2026-12-01 17:00 UTC |",
        "| CPU | Xeon, 2 cores (2 usable) |",
    ]  # fmt: skip
    assert "| measure | TorchServe | mqserve | ratio | target | met? |" in lines
    assert (
        "| noop, 2 workers, C=32: requests/s | 1,000 req/s | 2,500 req/s | 2.50\u00d7 "
        "| \u2265 2.0\u00d7 | yes |"
    ) in lines
    assert "* sync register, 1 worker, mqserve: 0.300 s, 0.500 s" in lines
    assert "* sync register, 1 worker, TorchServe: 1.500 s" in lines
    assert lines[-1] == "Note: mqserve closed 3 slow connections"


def test_row_properties() -> None:
    row = Row(measure("worker_rss_mib"), 200.0, 50.0)
    assert (row.ratio, row.met) == (0.25, True)


def test_report_as_json() -> None:
    samples = full_samples()
    report = compare.Report(build_rows(samples), samples, [("date", "d")])
    data = json.loads(json.dumps(compare.as_dict(report)))
    assert data["machine"] == {"date": "d"}
    first = data["rows"][0]
    assert first["key"] == "noop2_rps" and first["ratio"] == 2.5 and first["met"] is True
    assert data["samples"]["scale_s"] == {"torchserve": [2.5], "mqserve": [0.45]}


# -- the machine ----------------------------------------------------------------------------


def test_cpu_model_and_memory_from_proc() -> None:
    cpuinfo = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n"
    assert compare.cpu_model(cpuinfo) == "Intel(R) Xeon(R)"
    assert compare.cpu_model("processor: 0\n") == "?"
    assert compare.mem_total_gib("MemTotal:       24576000 kB\nMemFree: 1 kB\n") == pytest.approx(
        23.4375
    )
    assert compare.mem_total_gib("") is None


def test_dist_version_reads_the_dist_info_name(tmp_path: Path) -> None:
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "torch_model_archiver-0.12.0.dist-info").mkdir(parents=True)
    (site / "torch-2.13.0+cpu.dist-info").mkdir()
    assert compare.dist_version(tmp_path, "torch-model-archiver") == "0.12.0"
    assert compare.dist_version(tmp_path, "torch") == "2.13.0+cpu"
    assert compare.dist_version(tmp_path, "torchserve") is None


# -- the servers' configuration -------------------------------------------------------------


def test_config_properties_for_both_servers() -> None:
    ports = {
        "inference": 18080, "management": 18081, "metrics": 18082,
        "grpc_inference": 17070, "grpc_management": 17071,
    }  # fmt: skip
    text = servers.config_properties(ports, Path("/s"), {"initial_worker_port": "29500"})
    assert text.splitlines()[1:] == [
        "inference_address=http://127.0.0.1:18080",
        "management_address=http://127.0.0.1:18081",
        "metrics_address=http://127.0.0.1:18082",
        "grpc_inference_port=17070",
        "grpc_management_port=17071",
        "disable_token_authorization=true",
        "enable_model_api=true",
        "model_store=/s",
        "initial_worker_port=29500",
    ]


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ("command not found", None),
    ],
)
def test_java_major(output: str, major: int | None) -> None:
    assert servers.java_major(output) == major


def test_venv_marker_names_every_pin_with_torch_first() -> None:
    lines = servers.venv_marker_text().splitlines()
    assert lines == ["torch==2.13.0", "torchserve==0.12.0", "torch-model-archiver==0.12.0",
                     "pyyaml"]  # fmt: skip


def test_missing_java_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        servers.BenchError, match=r"java is not on PATH: TorchServe 0\.12 needs Java 17"
    ):
        servers.ensure_torchserve_venv(tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_pid_files() -> None:
    assert servers.parse_pid_file("1234\n1733050000.25\n") == (1234, 1733050000.25)
    assert servers.parse_pid_file("1234\n") == (1234, None)
    assert servers.parse_pid_file("") is None
    assert servers.parse_pid_file("x\n") is None


def test_server_environment_drops_what_points_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/repo")
    monkeypatch.setenv("MQSERVE_REDIS_URL", "redis://elsewhere")
    monkeypatch.setenv("TS_CONFIG_FILE", "/other.properties")
    monkeypatch.setenv("TS_ENABLE_MODEL_API", "false")
    env = servers.clean_env({"MQSERVE_HOME": "/h"})
    assert env["MQSERVE_HOME"] == "/h"
    assert not {"PYTHONPATH", "MQSERVE_REDIS_URL", "TS_CONFIG_FILE", "TS_ENABLE_MODEL_API"} & set(
        env
    )


def test_slow_header_never_ends() -> None:
    stream = header_bytes()
    sent = b"".join(next(stream) for _ in range(len(SLOW_PREFIX) + 100))
    assert sent.startswith(b"GET /ping HTTP/1.1\r\n")
    assert sent.endswith(b"a" * 100) and b"\r\n\r\n" not in sent


# -- arguments ------------------------------------------------------------------------------


def test_compare_defaults() -> None:
    args = build_parser().parse_args(["compare"])
    assert (args.only, args.duration, args.rounds, args.markdown) == (None, 5.0, 1, None)
    assert args.state_dir == servers.DEFAULT_STATE_DIR
    assert (args.client, args.json) == (None, False)


def test_compare_arguments() -> None:
    args = build_parser().parse_args(
        ["compare", "--only", "mqserve", "--duration", "1", "--rounds", "3", "--markdown",
         "/p.md", "--state-dir", "/st", "--client", "python", "--json"]
    )  # fmt: skip
    assert (args.only, args.duration, args.rounds) == ("mqserve", 1.0, 3)
    assert (args.markdown, args.state_dir, args.client, args.json) == (
        Path("/p.md"), Path("/st"), "python", True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [["--only", "litserve"], ["--rounds", "0"], ["--duration", "0"], ["--client", "curl"]],
)
def test_compare_rejects_bad_arguments(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["compare", *bad])
    assert exc.value.code == 2


def test_compare_plan_from_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``--only`` picks the servers; the report is printed with the machine first."""
    seen: list[compare.ComparePlan] = []

    def fake_run(plan: compare.ComparePlan, progress: object = None) -> compare.Report:
        seen.append(plan)
        samples = full_samples()
        return compare.Report(build_rows(samples), samples, [("date", "d")])

    monkeypatch.setattr(compare, "run_compare", fake_run)
    args = build_parser().parse_args(
        ["compare", "--only", "mqserve", "--client", "python", "--state-dir", str(tmp_path),
         "--markdown", str(tmp_path / "perf.md")]
    )  # fmt: skip
    text = run_compare(args)
    (plan,) = seen
    assert (tuple(plan.servers), plan.client, plan.state_dir) == (("mqserve",), "python", tmp_path)
    assert text.splitlines()[0] == "date: d"
    assert "noop, 2 workers, C=32: requests/s" in text
    assert (tmp_path / "perf.md").read_text().startswith("| what | |")
    args = build_parser().parse_args(["compare", "--client", "python"])
    run_compare(args)
    assert tuple(seen[-1].servers) == ("torchserve", "mqserve")
