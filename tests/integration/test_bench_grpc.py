"""``scripts/bench grpc`` end to end against a real mqserve it starts itself (its own
Redis, APIs, gRPC process, supervisor and workers): every measure gets a figure for both
protocols, the markdown and JSON say the same, and nothing it started is left running.
No timed assertions: the only bounds checked are the handler's own sleeps, which every
streamed answer must contain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.cli import main
from bench.grpc_bench import CLIENT_BOUND_NOTE, GrpcPlan
from tests.integration.test_bench_compare import processes_mentioning
from tests.support.processes import wait_for


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_grpc_bench_measures_both_protocols_and_stops_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    client = "wrk" if shutil.which("wrk") else "python"
    code = main(
        ["grpc", "--duration", "1", "--calls", "2", "--concurrency", "4", "--piece-delay", "50",
         "--state-dir", str(state), "--client", client, "--markdown", str(tmp_path / "g.md"),
         "--json"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    plan = GrpcPlan(concurrency=4, pieces=3, delay_ms=50)
    assert [row["measure"] for row in report["rows"]] == [m.label for m in plan.measures]
    for row in report["rows"]:
        for protocol in ("http", "grpc"):
            assert row[protocol] is not None and row[protocol] > 0, (row, protocol)
            # ABBA: each protocol visited twice in the one round.
            assert len(report["samples"][row["key"]][protocol]) == 2
    figures = {row["key"]: row for row in report["rows"]}
    for protocol in ("http", "grpc"):
        # The whole answer holds the handler's three 50 ms sleeps; the first chunk
        # arrives before the first of them ends.
        assert figures["stream_total_ms"][protocol] >= 150.0
        assert figures["stream_first_ms"][protocol] < figures["stream_total_ms"][protocol]
    assert report["notes"] == [CLIENT_BOUND_NOTE]  # and no load errors noted
    assert "HTTP: " in report["machine"]["load clients"]
    assert "gRPC: Python grpc.aio" in report["machine"]["load clients"]
    markdown = (tmp_path / "g.md").read_text()
    assert "| measure | HTTP | gRPC |" in markdown
    for measure in plan.measures:
        assert f"| {measure.label} | " in markdown
    assert "bench: gRPC inference on 127.0.0.1:" in captured.err  # progress goes to stderr
    # Stopped with everything it started: nothing runs from the state directory.
    wait_for(lambda: not processes_mentioning(str(state)), 30, "the stack to be gone")
