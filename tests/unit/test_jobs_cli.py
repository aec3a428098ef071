"""``mqserve batch`` and :class:`control.jobs.client.BatchClient` over fakeredis.

The Celery app is replaced by one that runs each chunk as it is queued (or never, to
exercise timeouts), so the command's whole flow runs in-process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest
from click.testing import CliRunner

from control.cli import cli
from control.core.home import Home
from control.core.settings import Settings
from control.jobs import client as batch_client
from control.jobs.client import BatchClient
from tests.unit.test_jobs import FakeModel, make_store
from workers.worker.batch import run_chunk


class EagerCelery:
    """Runs each chunk through ``model`` as soon as it is sent, unless ``paused``."""

    def __init__(self, client: fakeredis.FakeRedis, paused: bool = False) -> None:
        self.client = client
        self.model = FakeModel()
        self.paused = paused

    def send_task(self, name: str, args: Any = None, **options: Any) -> None:
        if not self.paused:
            run_chunk(self.client, self.model, *args)

    def close(self) -> None:
        pass


@pytest.fixture
def fake_client(redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch) -> EagerCelery:
    """Make every BatchClient use fakeredis and an eager Celery; returns the Celery."""
    celery = EagerCelery(redis_client)
    store = make_store(redis_client, celery)

    def init(self: BatchClient, settings: Settings) -> None:
        self._redis = redis_client
        self._celery = celery
        self._store = store

    monkeypatch.setattr(BatchClient, "__init__", init)
    return celery


def run(tmp_path: Path, lines: list[bytes], *extra: str) -> Any:
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b"\n".join(lines) + b"\n")
    args = ["batch", "echo", str(inputs), "-o", str(tmp_path / "out.jsonl")]
    return CliRunner().invoke(cli, [*args, "--redis-url", "redis://unused", *extra])


def output(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


def test_all_succeed(tmp_path: Path, fake_client: EagerCelery) -> None:
    result = run(tmp_path, [orjson.dumps({"x": i}) for i in range(40)])
    assert result.exit_code == 0, result.output
    assert output(tmp_path) == [{"index": i, "status": 200, "result": {"x": i}} for i in range(40)]
    assert "all 40 items succeeded" in result.output


def test_some_fail(tmp_path: Path, fake_client: EagerCelery) -> None:
    result = run(tmp_path, [b"1", b'"boom"', b"3"], "--version", "2.0")
    assert result.exit_code == 1, result.output
    assert [r["status"] for r in output(tmp_path)] == [503, 503, 503]  # one batch of 3
    result = run(tmp_path, [b"1", b'"boom"', b"3"])
    assert result.exit_code == 1
    assert [r["status"] for r in output(tmp_path)] == [200, 503, 200]
    assert "1 of 3 items failed" in result.output


def test_timeout_cancels_and_exits_2(tmp_path: Path, fake_client: EagerCelery) -> None:
    fake_client.paused = True
    result = run(tmp_path, [b"1", b"2"], "--timeout", "0.3")
    assert result.exit_code == 2, result.output
    assert "timed out after 0.3 s" in result.output
    assert "cancelled: 0 of 2 items finished" in result.output
    assert output(tmp_path) == [{"index": 0, "status": None}, {"index": 1, "status": None}]


def test_bad_inputs_and_models_exit_1_with_one_line(
    tmp_path: Path, fake_client: EagerCelery
) -> None:
    result = run(tmp_path, [b"1", b"{nope"])
    assert result.exit_code == 1
    assert "in.jsonl: Invalid JSON on line 2" in result.output
    result = run(tmp_path, [b""])
    assert (result.exit_code, "holds no inputs" in result.output) == (1, True)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("1\n")
    result = CliRunner().invoke(
        cli, ["batch", "nope", str(inputs), "-o", str(tmp_path / "o"), "--redis-url", "redis://x"]
    )
    assert (result.exit_code, result.output.strip()) == (1, "Error: Model not found: nope")


def test_settings_come_from_the_running_stack(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home")
    with pytest.raises(Exception, match="no running mqserve"):
        batch_client.cli_settings(home.root, None)
    home.make()
    home.settings_file.write_text(Settings(home=home.root, redis_url="unix:///s.sock").to_json())
    assert batch_client.cli_settings(home.root, None).redis_url == "unix:///s.sock"
    assert batch_client.cli_settings(home.root, "redis://h:1/0").redis_url == "redis://h:1/0"


def test_handle_waits_pages_and_reattaches(fake_client: EagerCelery) -> None:
    client = BatchClient(Settings())
    job = client.submit("echo", [{"x": i} for i in range(2500)])
    assert job.wait(timeout=5).status == "succeeded"
    assert job.progress() == (2500, 2500)
    results = list(client.job(job.id).results())
    assert [r["result"]["x"] for r in results] == list(range(2500))
    assert job.cancel().status == "succeeded"


def test_wait_times_out(fake_client: EagerCelery) -> None:
    fake_client.paused = True
    job = BatchClient(Settings()).submit("echo", [1])
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.05, poll=0.01)
    assert job.cancel().status == "cancelled"
    assert job.wait(timeout=1).status == "cancelled"


def attach(tmp_path: Path, job_id: str, *extra: str) -> Any:
    args = ["batch", "--attach", job_id, "-o", str(tmp_path / "out.jsonl"), *extra]
    return CliRunner().invoke(cli, [*args, "--redis-url", "redis://unused"])


def test_attach_writes_the_results_of_a_job_submitted_earlier(
    tmp_path: Path, fake_client: EagerCelery
) -> None:
    job = BatchClient(Settings()).submit("echo", [{"x": i} for i in range(40)])
    result = attach(tmp_path, job.id)
    assert result.exit_code == 0, result.output
    assert output(tmp_path) == [{"index": i, "status": 200, "result": {"x": i}} for i in range(40)]
    assert f"job {job.id} (echo 1.0, succeeded): 40 of 40 items finished" in result.output
    assert "all 40 items succeeded" in result.output


def test_attach_waits_like_a_fresh_run(tmp_path: Path, fake_client: EagerCelery) -> None:
    fake_client.paused = True
    job = BatchClient(Settings()).submit("echo", [1, 2])
    result = attach(tmp_path, job.id, "--timeout", "0.3")
    assert result.exit_code == 2, result.output
    assert "timed out after 0.3 s" in result.output
    assert output(tmp_path) == [{"index": 0, "status": None}, {"index": 1, "status": None}]


@pytest.mark.parametrize("job_id", ["0" * 32, "not-a-job-id"])
def test_attach_to_an_unknown_job_exits_1(
    tmp_path: Path, fake_client: EagerCelery, job_id: str
) -> None:
    result = attach(tmp_path, job_id)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: no batch job {job_id}: the id is unknown, or the job expired "
        "(jobs live in Redis for a day)\n"
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_attach_or_model_and_inputs(tmp_path: Path, fake_client: EagerCelery) -> None:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("1\n")
    both = CliRunner().invoke(
        cli, ["batch", "echo", str(inputs), "--attach", "0" * 32, "-o", "o", "--redis-url", "x"]
    )
    assert both.exit_code == 2 and "--attach takes no MODEL, INPUTS or --version" in both.output
    neither = CliRunner().invoke(cli, ["batch", "-o", "o", "--redis-url", "x"])
    assert neither.exit_code == 2 and "give MODEL and INPUTS, or --attach JOB_ID" in neither.output
    assert "--attach JOB_ID" in CliRunner().invoke(cli, ["batch", "--help"]).output


def test_ctrl_c_leaves_the_job_running_to_reattach(
    tmp_path: Path, fake_client: EagerCelery, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_client.paused = True

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(batch_client.time, "sleep", interrupt)
        result = run(tmp_path, [b"1", b"2", b"3"])
    assert result.exit_code == 2, result.output
    printed = re.search(r"job ([0-9a-f]{32}): 3 items", result.output)  # at submission
    assert printed is not None, result.output
    job_id = printed.group(1)
    assert f"`mqserve batch --attach {job_id} -o FILE`" in result.output
    assert not (tmp_path / "out.jsonl").exists()
    client = BatchClient(Settings())
    assert client.job(job_id).status().status == "queued"  # not cancelled
    run_chunk(fake_client.client, fake_client.model, job_id, 0, 3)  # a worker comes back
    result = attach(tmp_path, job_id)
    assert result.exit_code == 0, result.output
    assert [r["result"] for r in output(tmp_path)] == [1, 2, 3]
