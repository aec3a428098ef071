"""Batch jobs end to end: real Redis, a real supervisor and real worker processes.

Jobs go in through :class:`control.jobs.client.BatchClient` (straight onto the model's
Celery queue) or through the REST resources under gunicorn, which are restarted in the
middle of a job to show that a job lives in Redis only.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from control.core import keys, observed
from control.core.dispatch import Dispatcher
from control.core.envelope import Part
from control.core.redis_io import connect_async
from control.core.settings import Settings
from control.jobs.client import BatchClient
from control.jobs.store import UNBATCHED_CHUNK
from control.management.client import ManagementClient
from control.stack.children import worker_args
from tests.support.archives import build_mar
from tests.support.processes import (
    free_port,
    management_process,
    port_open,
    supervisor_process,
    wait_for,
)

SLOW = """
import time


def handle(data, context):
    if data is None:
        return None
    time.sleep(0.05)
    return [row.get("body") for row in data]
"""


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    build_mar(store / "noop.mar", "noop")
    build_mar(store / "slow.mar", "slow", extra={"noop_handler.py": SLOW.encode()})
    settings = stack_settings
    with (
        management_process(settings, tmp_path / "api") as base,
        supervisor_process(settings, tmp_path / "h1", "h1"),
        BatchClient(settings) as client,
    ):
        yield {"settings": settings, "api": ManagementClient(base), "jobs": client}


def register(api: ManagementClient, url: str, workers: int) -> None:
    response = api.register_model_with_params(
        {"url": url, "initial_workers": workers, "synchronous": "true"}
    )
    assert response.status == 200, response.body


def test_ten_thousand_items_finish_in_order(stack: dict[str, Any]) -> None:
    register(stack["api"], "noop.mar", 2)
    job = stack["jobs"].submit("noop", [{"x": i} for i in range(10_000)])
    status = job.wait(timeout=240)
    assert (status.status, status.done, status.failed) == ("succeeded", 10_000, 0)
    results = list(job.results())
    assert results == [{"index": i, "status": 200, "result": {"x": i}} for i in range(10_000)]


def test_cancel_stops_the_remaining_chunks(stack: dict[str, Any], real_redis: redis.Redis) -> None:
    register(stack["api"], "slow.mar", 1)
    job = stack["jobs"].submit("slow", list(range(200)))  # 13 chunks of up to 16
    wait_for(lambda: job.progress()[0] >= 3, 60, "the first items")
    cancelled = job.cancel()
    assert cancelled.status == "cancelled"
    queue = keys.batch_queue("slow", "1.0")
    # Every remaining chunk is taken off the queue and skipped.
    wait_for(lambda: real_redis.llen(queue) == 0, 30, "the queue to drain")
    wait_for(
        lambda: (
            [r.state.value for r in observed.workers_of(real_redis, "slow", "1.0")] == ["READY"]
        ),
        30,
        "the worker to go idle",
    )
    final = job.status()
    assert final.status == "cancelled"
    # At most the batch that was running when the job was cancelled finished after it.
    assert cancelled.done <= final.done <= cancelled.done + 1 < 200
    results = list(job.results())
    assert [r["status"] for r in results[final.done :]] == [None] * (200 - final.done)


def test_online_requests_share_a_worker_busy_with_a_job(
    stack: dict[str, Any], redis_url: str
) -> None:
    register(stack["api"], "slow.mar", 1)
    job = stack["jobs"].submit("slow", list(range(1000)))  # about 50 s of work
    wait_for(lambda: job.progress()[0] >= 5, 60, "the job to run")

    async def online_requests() -> None:
        # The API's request path as an API process runs it: asyncio, one reply listener.
        client = connect_async(redis_url)
        dispatcher = Dispatcher(client)
        try:
            for i in range(5):
                before = job.progress()[0]
                outcome = await dispatcher.send(
                    "slow", None, (Part("body", "application/json", b'"online"'),), {}
                )
                # Waits for the job's batch in progress, not for the job's other items:
                # counted in items the job finished meanwhile (its progress is written a
                # chunk at a time), not in seconds.
                assert job.progress()[0] - before <= UNBATCHED_CHUNK + 2, i
                assert (outcome.reply.status, outcome.reply.body) == (200, b"online"), i
        finally:
            await dispatcher.close()
            await client.aclose()

    asyncio.run(online_requests())
    assert job.progress()[0] < 900
    assert job.cancel().status == "cancelled"


@contextmanager
def jobs_api(settings: Settings, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The inference app (with the jobs routes) under gunicorn with the launcher's worker
    class, killable without a goodbye; yields its ``host:port`` and process."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    settings_file = workdir / "settings.json"
    settings = settings.replace(inference_address=f"http://127.0.0.1:{port}")
    settings_file.write_text(settings.to_json())
    log_path = workdir / f"gunicorn-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "control.server:inference_app()",
             "--bind", f"127.0.0.1:{port}", *worker_args("inference", 4),
             "--no-control-socket"],
            env={**os.environ, "MQSERVE_SETTINGS": str(settings_file)},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: port_open(port) or proc.poll() is not None, 30, "gunicorn")
            assert proc.poll() is None, log_path.read_text()
            yield f"127.0.0.1:{port}", proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


def call(
    address: str, method: str, path: str, body: bytes = b"", content_type: str = ""
) -> tuple[int, Any, dict[str, str]]:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_a_job_survives_an_api_restart(stack: dict[str, Any], tmp_path: Path) -> None:
    api, settings = stack["api"], stack["settings"]
    register(api, "noop.mar", 0)  # no workers yet: the job waits in the queue
    lines = b"".join(b'{"x": %d}\n' % i for i in range(500))
    with jobs_api(settings, tmp_path / "first") as (address, proc):
        status, body, headers = call(address, "POST", "/jobs/noop", lines, "application/jsonl")
        assert status == 202, body
        job = body["jobId"]
        assert headers["location"] == f"/jobs/{job}"
        os.killpg(proc.pid, signal.SIGKILL)  # the API dies without a goodbye
        proc.wait(15)
    with jobs_api(settings, tmp_path / "second") as (address, _):
        status, body, _ = call(address, "GET", f"/jobs/{job}")
        assert (status, body["status"], body["total"]) == (200, "queued", 500)
        assert api.scale("noop", {"min_worker": 1, "synchronous": "true"}).status == 200
        wait_for(
            lambda: call(address, "GET", f"/jobs/{job}")[1]["status"] == "succeeded",
            120,
            "the job to finish",
        )
        results: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            _, page, _ = call(address, "GET", f"/jobs/{job}/results?offset={offset}&limit=200")
            results.extend(page["results"])
            offset = page.get("nextOffset")
        assert results == [{"index": i, "status": 200, "result": {"x": i}} for i in range(500)]


def test_a_chunk_whose_worker_is_killed_is_requeued_at_once(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    register(stack["api"], "slow.mar", 1)
    job = stack["jobs"].submit("slow", list(range(160)))  # 10 chunks of 16, 0.8 s each
    wait_for(lambda: job.progress()[0] >= 20, 60, "the second chunk to run")
    [worker] = observed.workers_of(real_redis, "slow", "1.0")
    held = keys.held(worker.wid)
    chunk: dict[str, Any] = {}

    def midway() -> bool:
        # Kill mid-chunk (4 to 12 of its 16 items done: 0.3 s or more left), not between
        # chunks, when the worker holds nothing and there is nothing to requeue.
        chunk.update(json.loads(real_redis.get(held) or "{}"))
        return bool(chunk) and 4 <= job.progress()[0] - chunk["start"] <= 12

    wait_for(midway, 30, "the worker to be midway through a chunk")
    os.kill(worker.pid, signal.SIGKILL)
    assert chunk["job"] == job.id and chunk["end"] - chunk["start"] == 16
    killed = time.monotonic()
    # Far below the broker's 900 s visibility timeout: the supervisor requeues the chunk
    # as it reaps the worker and restarts one after its back-off (about 1 s).
    status = job.wait(timeout=60)
    assert time.monotonic() - killed < 60
    assert (status.status, status.done, status.failed) == ("succeeded", 160, 0)
    assert real_redis.hget(keys.job(job.id), f"requeued:{chunk['start']}") == "1"
    assert real_redis.hlen(keys.job_results(job.id)) == 160  # one result per item
    assert list(job.results()) == [{"index": i, "status": 200, "result": i} for i in range(160)]
    assert real_redis.exists(held) == 0
