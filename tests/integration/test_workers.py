"""Real supervisors and real worker processes over a real redis-server.

Each test drives the management API under gunicorn, with one or two supervisors run
exactly as ``mqserve supervisor`` runs them, and checks processes with psutil.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from control.core import keys, observed
from control.core.celery_app import make_celery
from control.core.home import Home
from control.core.settings import Settings
from control.management.client import ManagementClient
from tests.support.archives import build_mar
from tests.support.processes import management_process, supervisor_process, wait_for
from workers.worker.tasks import PREDICT_TASK

FAILING = """
def handle(data, context):
    if data is None:
        raise RuntimeError("weights are corrupt")
    return data
"""
SLOW = """
import time


def handle(data, context):
    if data is None:
        time.sleep(30)
    return [row.get("body") for row in data]
"""


supervisor = supervisor_process


@pytest.fixture
def stack(stack_settings: Settings, store: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    build_mar(store / "noop.mar", "noop")
    build_mar(store / "failing.mar", "failing", extra={"noop_handler.py": FAILING.encode()})
    build_mar(store / "slow.mar", "slow", extra={"noop_handler.py": SLOW.encode()})
    settings = stack_settings
    with management_process(settings, tmp_path / "api") as base:
        yield {"settings": settings, "api": ManagementClient(base), "tmp": tmp_path}


def worker_pids(client: redis.Redis, model: str, version: str = "1.0") -> list[int]:
    return [r.pid for r in observed.workers_of(client, model, version) if r.pid > 0]


def predict(settings: Settings, model: str, body: str, timeout: float = 60) -> dict[str, Any]:
    app = make_celery(settings)
    message = {
        "id": "req-1",
        "headers": {},
        "params": [{"name": "body", "content_type": "text/plain", "text": body}],
    }
    result = app.send_task(PREDICT_TASK, args=[message], queue=keys.batch_queue(model, "1.0"))
    try:
        reply: dict[str, Any] = result.get(timeout=timeout)
    finally:
        result.forget()
    return reply


def describe(api: ManagementClient, model: str) -> dict[str, Any]:
    response = api.describe(model)
    assert response.status == 200, response.body
    doc: dict[str, Any] = response.json()[0]
    return doc


def all_dead(pids: list[int]) -> Callable[[], bool]:
    return lambda: (
        not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    )


def test_register_scale_kill_unregister(stack: dict[str, Any], real_redis: redis.Redis) -> None:
    api, settings = stack["api"], stack["settings"]
    with supervisor(settings, stack["tmp"] / "h1", "h1"):
        response = api.register_model_with_params({"url": "noop.mar", "initial_workers": 2})
        assert response.status == 200, response.body
        doc = describe(api, "noop")
        assert [w["status"] for w in doc["workers"]] == ["READY", "READY"]
        pids = worker_pids(real_redis, "noop")
        assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
        assert all(w["pid"] in pids and w["memoryUsage"] > 0 for w in doc["workers"])
        assert predict(settings, "noop", "hello")["text"] == "hello"

        assert api.scale("noop", {"min_worker": 3, "synchronous": "true"}).status == 200
        assert len(worker_pids(real_redis, "noop")) == 3
        every = worker_pids(real_redis, "noop")
        assert api.scale("noop", {"min_worker": 1, "synchronous": "true"}).status == 200
        # Answered once the others stopped taking requests; they exit after draining.
        serving = [
            r.pid
            for r in observed.workers_of(real_redis, "noop", "1.0")
            if r.state.value != "DRAINING"
        ]
        assert len(serving) == 1
        wait_for(all_dead([p for p in every if p not in serving]), 30, "drained workers")
        wait_for(lambda: worker_pids(real_redis, "noop") == serving, 30, "records cleared")
        remaining = serving

        victim = remaining[0]
        victim_id = describe(api, "noop")["workers"][0]["id"]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: (
                [w["status"] for w in describe(api, "noop")["workers"]] == ["READY"]
                and worker_pids(real_redis, "noop") != [victim]
            ),
            60,
            "restarted worker",
        )
        revived = describe(api, "noop")["workers"][0]
        assert revived["id"] == victim_id  # the same worker, restarted, as in TorchServe
        assert predict(settings, "noop", "again")["text"] == "again"

        last = worker_pids(real_redis, "noop")
        assert api.unregister_model("noop").status == 200
        wait_for(all_dead(last), 30, "unregistered workers")
        wait_for(lambda: real_redis.keys(keys.slot("noop", "*", "*")) == [], 10, "leases freed")
        wait_for(lambda: observed.workers_of(real_redis, "noop", "1.0") == [], 10, "records")


def test_failing_initialize_shows_reason_and_backs_off(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    api, settings = stack["api"], stack["settings"]
    with supervisor(settings, stack["tmp"] / "h1", "h1"):
        response = api.register_model_with_params({"url": "failing.mar", "initial_workers": 1})
        assert response.status == 500
        assert response.json()["message"] == (
            "Failed to start workers for model failing version: 1.0"
        )
        assert api.describe("failing").status == 404  # a failed sync register rolls back

        response = api.register_model_with_params(
            {"url": "failing.mar", "initial_workers": 1, "synchronous": "false"}
        )
        assert response.status == 202
        wait_for(
            lambda: any(
                r.state.value == "FAILED" for r in observed.workers_of(real_redis, "failing", "1.0")
            ),
            60,
            "a FAILED record",
        )
        worker = describe(api, "failing")["workers"][0]
        assert worker["status"] == "UNLOADING"
        assert "weights are corrupt" in worker["lastError"]
        first = observed.workers_of(real_redis, "failing", "1.0")[0]
        # Back-off: the retry comes 1 s later, with the same id, and fails again.
        wait_for(
            lambda: any(
                r.started_at > first.started_at and r.state.value == "FAILED"
                for r in observed.workers_of(real_redis, "failing", "1.0")
            ),
            60,
            "a retried and failed worker",
        )
        assert api.unregister_model("failing").status == 200


def test_load_slower_than_startup_timeout(
    stack: dict[str, Any], real_redis: redis.Redis, store: Path
) -> None:
    api, settings = stack["api"], stack["settings"]
    with supervisor(settings, stack["tmp"] / "h1", "h1"):
        response = api.register_model_with_params(
            {"url": "slow.mar", "initial_workers": 1, "startup_timeout": 2}
        )
        assert response.status == 500, response.body
        assert api.describe("slow").status == 404
        wait_for(lambda: not observed.workers_of(real_redis, "slow", "1.0"), 30, "cleanup")


def test_two_supervisors_share_and_never_exceed(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    api, settings = stack["api"], stack["settings"]
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:  # count workers that are not draining while both reconcile
        while not done.wait(0.01):
            records = observed.workers_of(real_redis, "noop", "1.0")
            seen.append(sum(1 for r in records if r.state.value != "DRAINING"))

    with (
        supervisor(settings, stack["tmp"] / "h1", "h1"),
        supervisor(settings, stack["tmp"] / "h2", "h2"),
    ):
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            response = api.register_model_with_params({"url": "noop.mar", "initial_workers": 3})
            assert response.status == 200, response.body
            assert api.scale("noop", {"min_worker": 1, "synchronous": "true"}).status == 200
            assert api.scale("noop", {"min_worker": 4, "synchronous": "true"}).status == 200
        finally:
            done.set()
            sampler.join()
        hosts = {r.host for r in observed.workers_of(real_redis, "noop", "1.0")}
        assert hosts == {"h1", "h2"}
        assert api.unregister_model("noop").status == 200
    assert max(seen) == 4 and seen.count(4) > 0


def test_restarted_supervisor_adopts_its_workers(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    api, settings = stack["api"], stack["settings"]
    home = stack["tmp"] / "h1"
    with supervisor(settings, home, "h1") as first:
        assert (
            api.register_model_with_params({"url": "noop.mar", "initial_workers": 2}).status == 200
        )
        before = worker_pids(real_redis, "noop")
        first.kill()  # no drain: the workers go on without it
        first.wait(10)
        assert not any(all_dead([pid])() for pid in before)
        assert sorted(Home.at(home).live_workers()) == sorted(before)
        with supervisor(settings, home, "h1"):
            wait_for(
                lambda: (
                    [w["status"] for w in describe(api, "noop")["workers"]] == ["READY", "READY"]
                ),
                60,
                "the adopted workers",
            )
            # The same processes, owned again: their leases renewed past a lease's life.
            assert sorted(worker_pids(real_redis, "noop")) == sorted(before)
            lease = keys.slot("noop", "1.0", 0)
            wait_for(lambda: real_redis.pttl(lease) > 9000, 5, "a renewed lease")
            assert api.unregister_model("noop").status == 200
            # Adopted workers are drained and reaped as the supervisor's own.
            wait_for(all_dead(before), 30, "the adopted workers to drain")
            assert Home.at(home).live_workers() == []


def test_orphaned_workers_drain_once_their_lease_is_gone(
    stack: dict[str, Any], real_redis: redis.Redis
) -> None:
    api, settings = stack["api"], stack["settings"]
    home = stack["tmp"] / "h1"
    config = stack["tmp"] / "config.properties"
    config.write_text("orphan_grace=2\n")
    with supervisor(settings, home, "h1", {"TS_CONFIG_FILE": str(config)}) as first:
        assert (
            api.register_model_with_params({"url": "noop.mar", "initial_workers": 1}).status == 200
        )
        before = worker_pids(real_redis, "noop")
        first.kill()
        first.wait(10)
        # No supervisor comes back: the lease expires (10 s), then the grace (2 s).
        wait_for(all_dead(before), 40, "the orphaned worker to drain itself")
    assert Home.at(home).live_workers() == []
    assert api.unregister_model("noop").status == 200


HANGING = """
import time


def handle(data, context):
    if data is not None:
        time.sleep(60)
    return data
"""


def test_request_past_response_timeout_kills_the_worker(
    stack: dict[str, Any], real_redis: redis.Redis, store: Path
) -> None:
    build_mar(store / "hang.mar", "hang", extra={"noop_handler.py": HANGING.encode()})
    api, settings = stack["api"], stack["settings"]
    with supervisor(settings, stack["tmp"] / "h1", "h1"):
        response = api.register_model_with_params(
            {"url": "hang.mar", "initial_workers": 1, "response_timeout": 2}
        )
        assert response.status == 200, response.body
        [pid] = worker_pids(real_redis, "hang")
        app = make_celery(settings)
        message = {"id": "stuck", "headers": {}, "params": []}
        app.send_task(
            PREDICT_TASK, args=[message], queue=keys.batch_queue("hang", "1.0"), expires=5
        )
        wait_for(all_dead([pid]), 30, "the stuck worker to be killed")
        wait_for(
            lambda: any(
                "response_timeout of 2 s" in r.reason
                for r in observed.workers_of(real_redis, "hang", "1.0")
            ),
            30,
            "the failure reason",
        )
        # It comes back after the back-off, and the expired request is not run again.
        wait_for(
            lambda: [w["status"] for w in describe(api, "hang")["workers"]] == ["READY"],
            60,
            "the restarted worker",
        )
        assert api.unregister_model("hang").status == 200


def test_lost_host_share_moves_elsewhere(stack: dict[str, Any], real_redis: redis.Redis) -> None:
    api, settings = stack["api"], stack["settings"]
    with supervisor(settings, stack["tmp"] / "h2", "h2"):
        with supervisor(settings, stack["tmp"] / "h1", "h1") as doomed:
            response = api.register_model_with_params(
                {"url": "noop.mar", "initial_workers": 2, "synchronous": "false"}
            )
            assert response.status == 202
            wait_for(
                lambda: (
                    {
                        r.host
                        for r in observed.workers_of(real_redis, "noop", "1.0")
                        if r.state.serving
                    }
                    == {"h1", "h2"}
                ),
                60,
                "both hosts serving",
            )
            doomed.kill()  # the host vanishes: no drain, no goodbye
            doomed.wait(10)
        wait_for(
            lambda: (
                [r.host for r in observed.workers_of(real_redis, "noop", "1.0") if r.state.serving]
                == ["h2", "h2"]
            ),
            90,
            "h2 to take over",
        )
        assert api.unregister_model("noop").status == 200


def test_torch_model_archiver_archive_serves(stack: dict[str, Any], store: Path) -> None:
    """The iris example: built by the real torch-model-archiver, a BaseHandler subclass
    importing ts.torch_handler.base_handler, served by a real worker."""
    train = Path(__file__).resolve().parents[2] / "examples" / "iris" / "train.py"
    built = subprocess.run(
        [sys.executable, str(train), "--export-path", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    api, settings = stack["api"], stack["settings"]
    with supervisor(settings, stack["tmp"] / "h1", "h1"):
        response = api.register_model_with_params({"url": "iris.mar", "initial_workers": 1})
        assert response.status == 200, response.body
        app = make_celery(settings)
        message = {
            "id": "iris-1",
            "headers": {},
            "params": [
                {"name": "body", "content_type": "application/json", "text": "[5.1, 3.5, 1.4, 0.2]"}
            ],
        }
        result = app.send_task(PREDICT_TASK, args=[message], queue=keys.batch_queue("iris", "1.0"))
        reply = result.get(timeout=60)
        result.forget()
        assert reply["status"] == 200
        scores = json.loads(reply["text"])
        assert next(iter(scores)) == "setosa" and scores["setosa"] > 0.9
        assert api.unregister_model("iris").status == 200
