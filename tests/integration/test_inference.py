"""The inference API over real Redis, real supervisors and real worker processes.

Covers docs/torchserve-compat.md#inference-errors row by row, batching, the queue bound,
a worker killed mid-request, a request past its deadline, and /ping's truthfulness.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from control.core import keys, observed
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import api_process, supervisor_process, wait_for

PROBE = """
import json
import os
import time


class PredictionException(Exception):
    def __init__(self, message, error_code=500):
        super().__init__(message)
        self.message = message
        self.error_code = error_code


def handle(data, context):
    if data is None:
        return None
    ops = [row.get("body") for row in data]
    first = ops[0] if isinstance(ops[0], dict) else {}
    op = first.get("op", "echo")
    if op == "raise":
        raise ValueError("handler bug")
    if op == "oom":
        raise MemoryError("no room")
    if op == "nonlist":
        return "not a list"
    if op == "badlen":
        return [1] * (len(data) + 1)
    if op == "unserializable":
        return [object() for _ in data]
    if op == "predexc":
        raise PredictionException("teapot says no", 418)
    if op == "sleep":
        time.sleep(first["seconds"])
    if op == "die":
        os._exit(1)
    if op == "status":
        context.set_response_status(201, "Made", 0)
        context.set_response_header(0, "x-probe", "yes")
        context.set_response_content_type(0, "text/plain")
        return ["made"]
    ops = [row.decode("latin-1") if isinstance(row, (bytes, bytearray)) else row for row in ops]
    return [{"batch": len(data), "echo": row, "url_path": context.get_request_header(i, "url_path")}
            for i, row in enumerate(ops)]
"""


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    build_mar(store / "probe.mar", "probe", extra={"noop_handler.py": PROBE.encode()})
    build_mar(store / "probe2.mar", "probe", "2.0", extra={"noop_handler.py": PROBE.encode()})
    settings = stack_settings.replace(max_request_size=10_000)
    with (
        api_process(settings, tmp_path / "api") as management,
        api_process(settings, tmp_path / "api", "inference") as inference,
        supervisor_process(settings, tmp_path / "h1", "h1"),
    ):
        yield {"api": ManagementClient(management), "base": inference, "settings": settings}


def call(
    base: str,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    payload = body.encode() if isinstance(body, str) else body
    conn.request(method, path, body=payload, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def predict(base: str, payload: Any, path: str = "/predictions/probe") -> tuple[int, Any]:
    status, _, body = call(
        base, "POST", path, json.dumps(payload), {"Content-Type": "application/json"}
    )
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def register(api: ManagementClient, **params: Any) -> None:
    response = api.register_model_with_params({"url": "probe.mar", "initial_workers": 1, **params})
    assert response.status == 200, response.body


NO_WORKER = (
    "has no worker to serve inference request. Please use scale workers API to add "
    "workers. If this is a sequence inference, please check if it is closed, or "
    "expired; or exceeds maxSequenceJobQueueSize"
)


def test_error_rows(stack: dict[str, Any]) -> None:
    base, api = stack["base"], stack["api"]
    assert predict(base, {}) == (
        404,
        {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: probe"},
    )
    assert api.register_model_with_params({"url": "probe.mar"}).status == 200  # 0 workers
    assert predict(base, {}) == (
        503,
        {
            "code": 503,
            "type": "ServiceUnavailableException",
            "message": f'Model "probe" {NO_WORKER}',
        },
    )
    assert predict(base, {}, "/predictions/probe/1.0")[1]["message"] == (
        f'Model "probe" Version 1.0" {NO_WORKER}'
    )
    assert predict(base, {}, "/predictions/probe/9.9") == (
        404,
        {
            "code": 404,
            "type": "ModelVersionNotFoundException",
            "message": "Model version: 9.9 does not exist for model: probe",
        },
    )
    assert api.scale("probe", {"min_worker": 1, "synchronous": "true"}).status == 200
    rows = [
        ({"op": "raise"}, 503, "Prediction failed"),
        ({"op": "nonlist"}, 503, "Invalid model predict output"),
        ({"op": "badlen"}, 503, "number of batch response mismatched"),
        ({"op": "unserializable"}, 503, "Unsupported model output data type."),
        ({"op": "oom"}, 507, "Out of resources"),
        ({"op": "predexc"}, 418, "teapot says no"),
    ]
    for payload, code, message in rows:
        assert predict(base, payload) == (
            code,
            {"code": code, "type": "InternalServerException", "message": message},
        ), payload
    status, body = predict(base, {"x": 1}, "/predictions/probe/1.0/v1/chat")
    assert status == 200 and body == {"batch": 1, "echo": {"x": 1}, "url_path": "v1/chat"}
    status, headers, data = call(
        base, "POST", "/predictions/probe", '{"op": "status"}', {"Content-Type": "application/json"}
    )
    assert (status, headers["x-probe"], headers["content-type"], data) == (
        201,
        "yes",
        "text/plain",
        b"made",
    )
    status, headers, data = call(base, "POST", "/predictions/probe", "x" * 20_000)
    assert status == 413 and data == b""
    assert call(base, "GET", "/predictions")[0] == 404


def test_answers_and_paths(stack: dict[str, Any]) -> None:
    base, api = stack["base"], stack["api"]
    register(api)
    status, headers, data = call(base, "POST", "/predictions/probe", b"\x00\xffraw")
    assert status == 200
    assert "content-type" not in headers  # only the handler sets one
    assert json.loads(data)["echo"] == "\u0000\u00ffraw"  # raw bytes reach the handler
    for path in (
        "/v1/models/probe:predict",
        "/v2/models/probe/infer",
        "/probe/predict",
        "/models/probe/invoke",
        "/invocations?model_name=probe",
        "/explanations/probe",
    ):
        status, body = predict(base, {"k": "v"}, path)
        assert status == 200, (path, body)
    assert call(base, "POST", "/invocations")[0] == 400
    # customized=true asks the handler itself, through the model's queue.
    described = api.request("GET", "/models/probe", {"customized": "true"})
    assert described.status == 200, described.body
    assert described.json()[0]["customizedMetadata"]["batch"] == 1
    status, _, data = call(base, "OPTIONS", "/")
    assert status == 200 and json.loads(data)["openapi"].startswith("3.")


def test_batching_takes_first_then_waits_from_it(stack: dict[str, Any]) -> None:
    base, api = stack["base"], stack["api"]
    register(api, batch_size=4, max_batch_delay=700)
    started = time.monotonic()
    status, body = predict(base, {"n": 0})
    alone = time.monotonic() - started
    assert status == 200 and body["batch"] == 1
    assert alone >= 0.7  # a lone request waits the whole delay, counted from its taking
    seen: list[int] = []

    def one(i: int) -> None:
        seen.append(predict(base, {"n": i})[1]["batch"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(seen) >= 2 and all(1 <= n <= 4 for n in seen)


def test_queue_bound(stack: dict[str, Any], store: Path) -> None:
    base, api = stack["base"], stack["api"]
    build_mar(
        store / "tiny.mar",
        "tiny",
        extra={"noop_handler.py": PROBE.encode()},
        config_yaml="jobQueueSize: 2\nminWorkers: 1\nmaxWorkers: 1\n",
    )
    assert api.register_model_with_params({"url": "tiny.mar"}).status == 200
    results: list[int] = []

    def slow() -> None:
        results.append(predict(base, {"op": "sleep", "seconds": 2}, "/predictions/tiny")[0])

    threads = [threading.Thread(target=slow) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(503) >= 1 and results.count(200) >= 2


def test_worker_killed_mid_request(stack: dict[str, Any], real_redis: redis.Redis) -> None:
    base, api = stack["base"], stack["api"]
    register(api)
    [worker] = observed.workers_of(real_redis, "probe", "1.0")
    answer: list[Any] = []
    thread = threading.Thread(
        target=lambda: answer.append(predict(base, {"op": "sleep", "seconds": 30}))
    )
    thread.start()
    wait_for(lambda: real_redis.llen(keys.inflight(worker.wid)) == 1, 30, "request taken")
    os.kill(worker.pid, signal.SIGKILL)
    thread.join(60)
    assert answer == [
        (507, {"code": 507, "type": "InternalServerException", "message": "Worker died."})
    ]
    # The worker comes back and the model serves again.
    wait_for(lambda: predict(base, {"again": True})[0] == 200, 60, "serving again")


def test_unregister_answers_the_queued_requests_at_once(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    base, api = stack["base"], stack["api"]
    register(api, batch_size=1)
    [worker] = observed.workers_of(real_redis, "probe", "1.0")
    answers: dict[str, tuple[int, Any]] = {}
    order: list[str] = []

    def send(name: str, seconds: float) -> None:
        answers[name] = predict(base, {"op": "sleep", "seconds": seconds})
        order.append(name)

    running = threading.Thread(target=send, args=("running", 6))
    running.start()
    wait_for(lambda: real_redis.llen(keys.inflight(worker.wid)) == 1, 30, "request taken")
    queued = [threading.Thread(target=send, args=(f"q{i}", 0)) for i in range(3)]
    for thread in queued:
        thread.start()
    queue = keys.online_queue("probe", "1.0")
    wait_for(lambda: real_redis.llen(queue) == 3, 30, "three requests queued")
    unregister = threading.Thread(target=lambda: answers.update(done=api.unregister_model("probe")))
    unregister.start()
    for thread in queued:
        thread.join(60)
    # Answered while the running request still runs: not at a deadline, not after the drain.
    assert running.is_alive() and sorted(order) == ["q0", "q1", "q2"]
    no_worker = {
        "code": 503,
        "type": "ServiceUnavailableException",
        "message": f'Model "probe" {NO_WORKER}',
    }
    assert [answers[f"q{i}"] for i in range(3)] == [(503, no_worker)] * 3
    running.join(60)
    unregister.join(60)
    assert answers["running"][0] == 200  # the drain let it finish
    assert answers["done"].status == 200
    assert real_redis.llen(queue) == 0


def test_request_past_deadline_is_not_run(stack: dict[str, Any], real_redis: redis.Redis) -> None:
    base, api = stack["base"], stack["api"]
    register(api, response_timeout=1)
    status, body = predict(base, {"op": "sleep", "seconds": 3})
    # The worker is killed for exceeding response_timeout; the client hears "Worker died."
    assert (status, body["message"]) == (500, "Worker died.")
    wait_for(lambda: predict(base, {"x": 1})[0] == 200, 60, "serving again")
    # A request older than clientTimeoutInMills when taken is not run: it is answered 408.
    spec_deadline = time.time() - 1
    from control.core.envelope import Reply, Request
    from workers.worker.serving import EXPIRED

    stale = Request(
        id="stale",
        model="probe",
        version="1.0",
        deadline=spec_deadline,
        enqueued=spec_deadline - 1,
        parts=(),
    )
    real_redis.lpush(keys.online_queue("probe", "1.0"), stale.frame())
    wait_for(lambda: real_redis.llen(keys.online_queue("probe", "1.0")) == 0, 30, "taken")
    frames = redis.Redis.from_url(stack["settings"].redis_url)  # bytes, not text
    reply = Reply.parse(frames.blpop([keys.reply("stale")], timeout=10)[1])
    assert (reply.status, reply.error, reply.body) == (408, EXPIRED, b"")


def test_ping_follows_live_workers(stack: dict[str, Any], real_redis: redis.Redis) -> None:
    base, api = stack["base"], stack["api"]
    assert call(base, "GET", "/ping")[:1] == (200,)
    register(api)
    assert json.loads(call(base, "GET", "/ping")[2]) == {"status": "Healthy"}
    [worker] = observed.workers_of(real_redis, "probe", "1.0")
    os.kill(worker.pid, signal.SIGKILL)
    wait_for(lambda: call(base, "GET", "/ping")[0] == 500, 30, "unhealthy")
    assert json.loads(call(base, "GET", "/ping")[2]) == {"status": "Unhealthy"}
    wait_for(lambda: call(base, "GET", "/ping")[0] == 200, 60, "healthy again")


def test_metrics_count_the_requests(stack: dict[str, Any], tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    base, api, settings = stack["base"], stack["api"], stack["settings"]
    register(api, batch_size=2, max_batch_delay=50)
    for i in range(5):
        assert predict(base, {"i": i})[0] == 200
    assert predict(base, {"i": 0}, "/predictions/probe/1.0")[0] == 200
    assert predict(base, {"op": "raise"})[0] == 503
    with api_process(settings, tmp_path / "metrics", "metrics") as metrics:

        def value(name: str, **labels: str) -> float:
            """Sum of the samples named ``name`` (the parser names counter samples *_total)."""
            text = call(metrics, "GET", "/metrics")[2].decode()
            samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
            return sum(
                s.value
                for s in samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            )

        wait_for(
            lambda: (
                value("ts_inference_requests_total", model_name="probe", model_version="default")
                == 5
                and value("ts_inference_requests_total", model_name="probe", model_version="1.0")
                == 1
            ),
            15,
            "flushed counters",
        )
        assert value("ts_inference_latency_microseconds_total", model_name="probe") > 0
        wait_for(
            lambda: value("Requests5XX_total") >= 1 and value("Requests2XX_total") >= 6,
            15,
            "status counters",
        )
        wait_for(
            lambda: value("mqserve_batch_size_count", model_name="probe") >= 6, 15, "batch sizes"
        )
        assert value("mqserve_workers", model_name="probe", state="READY") == 1
        _, headers, body = call(metrics, "GET", "/metrics?name[]=Requests2XX")
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert set(f.name for f in text_string_to_metric_families(body.decode())) == {"Requests2XX"}
