"""Workloads shaped like real ones, over real Redis, API processes and worker processes.

Slow models (seconds, past every client library's default timeout), long batching
windows, queues under load, a model whose only worker failed, and routing right after
set-default across two API processes (read your writes).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from control.core import keys, observed
from control.core.observed import WorkerState
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.integration.test_inference import NO_WORKER, call
from tests.support.archives import build_mar
from tests.support.processes import api_process, supervisor_process, wait_for

HANDLER = """
import json
import time


def handle(data, context):
    if data is None:
        return None
    bodies = [row.get("body") for row in data]
    bodies = [json.loads(b) if isinstance(b, (bytes, bytearray)) else b for b in bodies]
    first = bodies[0] if isinstance(bodies[0], dict) else {}
    time.sleep(float(first.get("sleep", 0)))  # one sleep per batch, like a forward pass
    version = context.manifest["model"]["modelVersion"]
    return [{"batch": len(data), "version": version, "echo": b} for b in bodies]
"""

FAIL_ON_LOAD = """
def handle(data, context):
    raise RuntimeError("weights are missing")
"""


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    extra = {"noop_handler.py": HANDLER.encode()}
    build_mar(store / "slow.mar", "slow", extra=extra)
    build_mar(store / "slow2.mar", "slow", "2.0", extra=extra)
    build_mar(store / "broken.mar", "broken", extra={"noop_handler.py": FAIL_ON_LOAD.encode()})
    settings = stack_settings
    with (
        api_process(settings, tmp_path / "api") as management,
        api_process(settings, tmp_path / "api", "inference") as first,
        api_process(settings, tmp_path / "api", "inference") as second,
        supervisor_process(settings, tmp_path / "h1", "h1"),
    ):
        yield {"api": ManagementClient(management), "bases": (first, second)}


def predict(base: str, payload: Any, path: str = "/predictions/slow") -> tuple[int, Any]:
    status, _, body = call(
        base, "POST", path, json.dumps(payload), {"Content-Type": "application/json"}
    )
    return status, json.loads(body)


def register(api: ManagementClient, url: str = "slow.mar", **params: Any) -> None:
    response = api.register_model_with_params({"url": url, "initial_workers": 1, **params})
    assert response.status == 200, response.body


def in_threads(count: int, work: Any) -> list[Any]:
    """Run ``work(i)`` for ``i < count`` concurrently; their results in order."""
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_a_seven_second_prediction_answers(stack: dict[str, Any]) -> None:
    register(stack["api"])
    started = time.monotonic()
    status, body = predict(stack["bases"][0], {"sleep": 7})
    assert (status, body["batch"]) == (200, 1), body
    assert time.monotonic() - started >= 7


def test_three_requests_in_a_six_second_batching_window(stack: dict[str, Any]) -> None:
    register(stack["api"], batch_size=3, max_batch_delay=6000)
    base = stack["bases"][0]
    results = in_threads(3, lambda i: predict(base, {"i": i}))
    assert [status for status, _ in results] == [200, 200, 200], results
    assert sorted(body["echo"]["i"] for _, body in results) == [0, 1, 2]
    assert [body["batch"] for _, body in results] == [3, 3, 3]  # one batch, not three


def test_slower_than_response_timeout_fails_at_the_timeout_not_before(
    stack: dict[str, Any],
) -> None:
    register(stack["api"], response_timeout=3)
    started = time.monotonic()
    status, body = predict(stack["bases"][0], {"sleep": 30})
    elapsed = time.monotonic() - started
    assert (status, body["message"]) == (500, "Worker died.")
    assert 3 <= elapsed < 20, elapsed  # the supervisor killed it at response_timeout


def test_describe_counts_the_online_requests_waiting(
    stack: dict[str, Any], real_redis: redis.Redis, tmp_path: Path, stack_settings: Settings
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    api, base = stack["api"], stack["bases"][0]
    register(api)
    results: list[Any] = []
    # One request occupies the worker for a while; five more wait in the online queue.
    first = threading.Thread(target=lambda: results.append(predict(base, {"sleep": 4})))
    first.start()
    wait_for(
        lambda: any(
            w.state is WorkerState.BUSY for w in observed.workers_of(real_redis, "slow", "1.0")
        ),
        30,
        "the worker to be busy",
    )
    waiting = [
        threading.Thread(target=lambda: results.append(predict(base, {"n": 1}))) for _ in range(5)
    ]
    for thread in waiting:
        thread.start()
    wait_for(lambda: real_redis.llen(keys.online_queue("slow", "1.0")) == 5, 30, "5 queued")
    [doc] = api.describe("slow").json()
    assert doc["jobQueueStatus"] == {"remainingCapacity": 95, "pendingRequests": 5}
    with api_process(stack_settings, tmp_path / "metrics", "metrics") as metrics:
        text = call(metrics, "GET", "/metrics?name[]=mqserve_queue_depth")[2].decode()
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        depth = [s.value for s in samples if s.labels.get("model_name") == "slow"]
        assert depth == [5.0]
    for thread in [first, *waiting]:
        thread.join(60)
    assert [status for status, _ in results] == [200] * 6
    [doc] = api.describe("slow").json()
    assert doc["jobQueueStatus"] == {"remainingCapacity": 100, "pendingRequests": 0}


def test_a_model_whose_only_worker_failed_answers_503_at_once(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    api, base = stack["api"], stack["bases"][0]
    response = api.register_model_with_params(
        {"url": "broken.mar", "initial_workers": 1, "synchronous": "false"}
    )
    assert response.status == 202
    wait_for(
        lambda: any(
            w.state is WorkerState.FAILED for w in observed.workers_of(real_redis, "broken", "1.0")
        ),
        60,
        "the worker to fail",
    )
    started = time.monotonic()
    status, body = predict(base, {}, "/predictions/broken")
    assert (status, body["message"]) == (503, f'Model "broken" {NO_WORKER}')
    assert time.monotonic() - started < 5  # not after response_timeout (120 s)
    assert json.loads(call(base, "GET", "/ping")[2]) == {"status": "Unhealthy"}


def test_queued_requests_get_503_when_no_worker_is_left(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    api, base = stack["api"], stack["bases"][0]
    register(api)
    results: list[Any] = []
    busy = threading.Thread(target=lambda: results.append(predict(base, {"sleep": 3})))
    busy.start()
    wait_for(lambda: real_redis.llen(keys.inflight(_only_worker(real_redis))) == 1, 30, "running")
    queued = threading.Thread(target=lambda: results.append(predict(base, {"n": 1})))
    queued.start()
    wait_for(lambda: real_redis.llen(keys.online_queue("slow", "1.0")) == 1, 30, "queued")
    # Scale to zero: the worker finishes the request it runs, the queued one has no
    # worker left and is answered at once instead of waiting for one that never comes.
    assert api.scale("slow", {"min_worker": 0, "synchronous": "false"}).status == 202
    busy.join(60)
    queued.join(60)
    assert sorted(status for status, _ in results) == [200, 503], results
    assert real_redis.llen(keys.online_queue("slow", "1.0")) == 0


def _only_worker(client: redis.Redis) -> str:
    [worker] = observed.workers_of(client, "slow", "1.0")
    return worker.wid


def test_predictions_right_after_set_default_reach_the_new_default(
    stack: dict[str, Any],
) -> None:
    api, bases = stack["api"], stack["bases"]
    register(api)
    register(api, "slow2.mar")
    for round_ in range(4):
        for base in bases:  # both API processes have the current default cached
            assert predict(base, {})[1]["version"] == ("1.0" if round_ % 2 == 0 else "2.0")
        new = "2.0" if round_ % 2 == 0 else "1.0"
        assert api.request("PUT", f"/models/slow/{new}/set-default").status == 200
        for base in bases:  # the very next request, in every process
            assert predict(base, {})[1]["version"] == new, (round_, base)
