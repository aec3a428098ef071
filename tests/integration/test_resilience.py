"""A stack rides out a Redis restart and bad messages, without restarting any process.

A real redis-server (append-only, as an external one would be) is stopped and started
again under a running supervisor and its worker; malformed frames are pushed onto a
model's online queue and garbage onto its Celery queue. Every time, the same processes
serve the next prediction with 200.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import redis

from control.core import keys, observed
from control.core.celery_app import make_celery
from control.core.envelope import Reply, pack
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import (
    RestartableRedis,
    api_process,
    restartable_redis,
    supervisor_process,
    wait_for,
)
from workers.worker.tasks import PREDICT_TASK

#: How long Redis stays down: longer than a worker record's TTL (3 s) would be
#: needed to expire records, so 3 s also proves the supervisor's grace after an outage.
OUTAGE_SECONDS = 3.0


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = tmp_path / "store"
    store.mkdir()
    build_mar(store / "noop.mar", "noop")
    with restartable_redis(tmp_path / "redis") as server:
        settings = Settings(
            model_store=store,
            enable_model_api=True,
            disable_token_authorization=True,
            redis_url=server.url,
            home=tmp_path / "home",
            worker_spawn_timeout=60,
        )
        with (
            api_process(settings, tmp_path / "api") as management,
            api_process(settings, tmp_path / "api", "inference") as inference,
            supervisor_process(settings, tmp_path / "h1", "h1") as supervisor,
        ):
            api = ManagementClient(management)
            response = api.register_model_with_params({"url": "noop.mar", "initial_workers": 1})
            assert response.status == 200, response.body
            yield {
                "server": server,
                "settings": settings,
                "inference": inference,
                "supervisor": supervisor,
                "log": tmp_path / "h1" / "supervisor-h1.log",
                "worker_logs": tmp_path / "h1" / "logs",
                "redis": redis.Redis.from_url(server.url),
            }


def predict(base: str, text: str) -> tuple[int, bytes]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=60)
    try:
        conn.request("POST", "/predictions/noop", body=text, headers={"Content-Type": "text/plain"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def worker_pids(client: redis.Redis) -> list[int]:
    return sorted(r.pid for r in observed.workers_of(client, "noop", "1.0"))


def serving(stack: dict[str, Any]) -> bool:
    return predict(stack["inference"], "ping") == (200, b"ping")


def test_a_redis_restart_leaves_the_same_processes_serving(stack: dict[str, Any]) -> None:
    server: RestartableRedis = stack["server"]
    assert serving(stack)
    pids = worker_pids(stack["redis"])
    assert len(pids) == 1
    supervisor = stack["supervisor"]

    server.stop()
    # The outage has a set length (the test's input), and the supervisor notices it.
    wait_for(lambda: "Redis unavailable" in stack["log"].read_text(), 30, "outage logged")
    time.sleep(max(OUTAGE_SECONDS - 1.0, 0.0))
    server.start()

    wait_for(lambda: serving(stack), 60, "predictions served again")
    assert supervisor.poll() is None
    assert worker_pids(stack["redis"]) == pids
    assert all(psutil.pid_exists(p) for p in pids)
    # Its next tick (after its back-off) logs the recovery: one line each way.
    wait_for(lambda: "supervisor: Redis is back" in stack["log"].read_text(), 30, "recovery")
    assert stack["log"].read_text().count("supervisor: Redis unavailable") == 1
    # The Celery consumer reconnected by itself too.
    assert celery_predict(stack["settings"], {"id": "c1", "params": [text_param("hi")]}) == {
        "status": 200, "reason": "", "headers": {}, "content_type": None, "text": "hi",
    }  # fmt: skip
    assert worker_pids(stack["redis"]) == pids


def text_param(text: str) -> dict[str, str]:
    return {"name": "body", "content_type": "text/plain", "text": text}


def celery_predict(settings: Settings, message: Any) -> dict[str, Any]:
    app = make_celery(settings)
    result = app.send_task(PREDICT_TASK, args=[message], queue=keys.batch_queue("noop", "1.0"))
    try:
        reply: dict[str, Any] = result.get(timeout=60)
    finally:
        result.forget()
    return reply


def good_header(rid: str) -> dict[str, Any]:
    return {
        "id": rid, "model": "noop", "version": "1.0", "deadline": 0, "enqueued": time.time(),
        "headers": {}, "kind": "predict", "parts": [["body", "text/plain", 2]],
    }  # fmt: skip


def test_malformed_frames_are_answered_and_the_worker_serves_on(stack: dict[str, Any]) -> None:
    client: redis.Redis = stack["redis"]
    assert serving(stack)
    pids = worker_pids(client)
    malformed = {
        "bad-headers": pack(good_header("bad-headers") | {"headers": ["x"]}, b"hi"),
        "bad-parts": pack(good_header("bad-parts") | {"parts": [["body", 1]]}, b"hi"),
        "bad-size": pack(good_header("bad-size") | {"parts": [["body", "t", -1]]}, b"hi"),
        "bad-deadline": pack(good_header("bad-deadline") | {"deadline": "soon"}, b"hi"),
        "bad-kind": pack(good_header("bad-kind") | {"kind": 7}, b"hi"),
    }
    unreadable = [b"garbage", b"\x00\x00\x00\x05[1,2]", pack({"id": 5}, b"")]
    queue = keys.online_queue("noop", "1.0")
    client.lpush(queue, *malformed.values(), *unreadable)

    answered: dict[str, Reply] = {}
    for rid in malformed:
        popped = client.blpop([keys.reply(rid)], timeout=30)
        assert popped is not None, rid
        frame = popped[1]
        assert isinstance(frame, bytes)
        answered[rid] = Reply.parse(frame)
    assert len(answered) == len(malformed)
    assert {r.status for r in answered.values()} == {400}
    assert all((r.error or "").startswith("Malformed request frame") for r in answered.values())

    assert serving(stack)
    assert client.llen(queue) == 0
    assert all(client.llen(keys.inflight(str(r.wid))) == 0 for r in workers(client))
    assert worker_pids(client) == pids
    states = [r.state.value for r in workers(client)]
    assert states == ["READY"]


def workers(client: redis.Redis) -> list[observed.WorkerRecord]:
    return observed.workers_of(client, "noop", "1.0")


def test_garbage_on_the_celery_queue_leaves_the_worker_serving(stack: dict[str, Any]) -> None:
    client: redis.Redis = stack["redis"]
    settings: Settings = stack["settings"]
    assert serving(stack)
    pids = worker_pids(client)
    queue = keys.batch_queue("noop", "1.0")
    body = '{"body": "!!!", "properties": {"body_encoding": "base64", "delivery_tag": "t"}}'
    client.lpush(queue, b"not json at all", b"\xff\xfe", b'{"a": 1}', b"[1, 2]", body.encode())
    wait_for(lambda: client.llen(queue) == 0, 30, "the garbage consumed")

    # Messages that are tasks but not requests are answered 400, not raised.
    bad = [None, {"id": "x", "headers": ["h"]}, {"id": "x", "params": [{"name": "body"}]}]
    answers = [celery_predict(settings, message) for message in bad]
    assert [a["status"] for a in answers] == [400, 400, 400]
    assert all(a["error"].startswith("Invalid request message") for a in answers)

    assert celery_predict(settings, {"id": "ok", "params": [text_param("still")]})["text"] == (
        "still"
    )
    assert serving(stack)
    assert worker_pids(client) == pids
    worker_log = "".join(
        p.read_text(errors="replace") for p in stack["worker_logs"].glob("worker-*.log")
    )
    assert worker_log.count("dropped a") >= 5, worker_log[-3000:]
    assert "Unrecoverable error" not in worker_log
    assert json.loads(json.dumps(answers))  # plain JSON, as a Celery client gets it
