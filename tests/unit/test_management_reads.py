"""Describe and list from one Redis round trip each (``control.management.reads``), with
nothing cached: a describe sent after a change returned shows it."""

from __future__ import annotations

import time
from typing import Any

import fakeredis
import fakeredis.aioredis
import pytest
from falcon import testing

from control.archives.store import ModelStore
from control.core import keys, observed
from control.core.dispatch import Delivery, NoWorker
from control.core.envelope import Reply
from control.core.observed import WorkerRecord, WorkerState
from control.core.settings import Settings
from control.management.api import create_management_app
from control.management.reads import ManagementReads
from control.management.service import ManagementService
from tests.support.asgi import async_twin

NOW = time.time()


class Counting(fakeredis.aioredis.FakeRedis):
    """An asyncio fake client that records the commands it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[str] = []

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


@pytest.fixture
def counting(redis_client: fakeredis.FakeRedis) -> Counting:
    return Counting(server=redis_client.connection_pool.connection_kwargs["server"])


@pytest.fixture
def app(redis_client: fakeredis.FakeRedis, counting: Counting, settings: Settings) -> Any:
    store = ModelStore(settings.model_store, settings.allowed_urls)
    service = ManagementService(settings, redis_client, store)
    return testing.TestClient(create_management_app(service, None, reads=ManagementReads(counting)))


def worker(wid: str, state: WorkerState = WorkerState.READY, version: str = "1.0") -> WorkerRecord:
    return WorkerRecord(wid, "noop", version, "h", 100 + int(wid), -1, state, NOW, memory=7)


def round_trips(app: testing.TestClient, counting: Counting, path: str) -> list[str]:
    """The commands one GET of ``path`` sends, once the scripts are loaded."""
    assert app.simulate_get(path).status_code == 200  # loads the script (EVALSHA, LOAD)
    counting.commands.clear()
    assert app.simulate_get(path).status_code == 200
    return list(counting.commands)


def test_describe_is_one_round_trip_however_many_versions_and_workers(
    app: testing.TestClient, counting: Counting, redis_client: fakeredis.FakeRedis
) -> None:
    for url in ("noop.mar", "noop_v2.mar"):
        assert app.simulate_post("/models", params={"url": url}).status_code == 200
    for wid, ver in (("9000", "1.0"), ("9001", "1.0"), ("9002", "2.0")):
        observed.publish(redis_client, worker(wid, version=ver), ttl=60)
    # A host with GPUs (read for a model whose device type is not cpu) and queued requests.
    redis_client.hset(keys.host("h"), mapping={"gpus": 1, "heartbeat": NOW})
    redis_client.lpush(keys.online_queue("noop", "1.0"), b"frame", b"frame")
    for path in ("/models/noop", "/models/noop/2.0", "/models/noop/all"):
        assert round_trips(app, counting, path) == ["EVALSHA"]
    [one, two] = app.simulate_get("/models/noop/all").json
    assert [w["id"] for w in one["workers"]] == ["9000", "9001"]
    assert [w["id"] for w in two["workers"]] == ["9002"]
    assert one["jobQueueStatus"] == {"remainingCapacity": 98, "pendingRequests": 2}
    assert one["deviceType"] == "gpu"


def test_list_is_one_round_trip(app: testing.TestClient, counting: Counting) -> None:
    for url in ("noop.mar", "noop_v2.mar", "other.mar"):
        assert app.simulate_post("/models", params={"url": url}).status_code == 200
    assert round_trips(app, counting, "/models") == ["EVALSHA"]
    assert round_trips(app, counting, "/models?limit=1&next_page_token=1") == ["EVALSHA"]
    assert app.simulate_get("/models", params={"limit": "1", "next_page_token": "1"}).json == {
        "nextPageToken": "2",
        "models": [{"modelName": "other", "modelUrl": "other.mar"}],
    }


def test_describe_prunes_workers_whose_record_expired(
    app: testing.TestClient, redis_client: fakeredis.FakeRedis
) -> None:
    assert app.simulate_post("/models", params={"url": "noop.mar"}).status_code == 200
    observed.publish(redis_client, worker("9000"), ttl=60)
    redis_client.sadd(keys.workers("noop", "1.0"), "9001")  # its hash expired
    assert [w["id"] for w in app.simulate_get("/models/noop").json[0]["workers"]] == ["9000"]
    assert redis_client.smembers(keys.workers("noop", "1.0")) == {"9000"}


def test_a_describe_after_a_change_shows_it(app: testing.TestClient) -> None:
    for url in ("noop.mar", "noop_v2.mar"):
        assert app.simulate_post("/models", params={"url": url}).status_code == 200
    assert app.simulate_get("/models/noop").json[0]["modelVersion"] == "1.0"
    assert app.simulate_put("/models/noop/2.0/set-default").status_code == 200
    assert app.simulate_get("/models/noop").json[0]["modelVersion"] == "2.0"
    assert app.simulate_put("/models/noop", params={"min_worker": "3"}).status_code == 202
    assert app.simulate_get("/models/noop").json[0]["minWorkers"] == 3
    assert app.simulate_delete("/models/noop/1.0").status_code == 200
    assert [d["modelVersion"] for d in app.simulate_get("/models/noop/all").json] == ["2.0"]
    assert app.simulate_get("/models/noop/1.0").status_code == 404


def test_missing_model_and_version_are_torchserve_404s(app: testing.TestClient) -> None:
    assert app.simulate_get("/models/nope").json == {
        "code": 404,
        "type": "ModelNotFoundException",
        "message": "Model not found: nope",
    }
    assert app.simulate_post("/models", params={"url": "noop.mar"}).status_code == 200
    assert app.simulate_get("/models/noop/9.9").json == {
        "code": 404,
        "type": "ModelVersionNotFoundException",
        "message": "Model version: 9.9 does not exist for model: noop",
    }


class Describing:
    """Stands in for the Dispatcher: answers a describe request as a worker would."""

    def __init__(self, reply: Reply | Exception) -> None:
        self.reply = reply
        self.sent: list[tuple[Any, ...]] = []

    async def send(self, *args: Any, **kwargs: Any) -> Delivery:
        self.sent.append((*args, kwargs))
        if isinstance(self.reply, Exception):
            raise self.reply
        return Delivery(self.reply, 0.0, "1.0")


def customized_app(redis_client: fakeredis.FakeRedis, settings: Settings, dispatcher: Any) -> Any:
    store = ModelStore(settings.model_store, settings.allowed_urls)
    service = ManagementService(settings, redis_client, store)
    reads = ManagementReads(async_twin(redis_client), dispatcher)
    app = testing.TestClient(create_management_app(service, None, reads=reads))
    assert app.simulate_post("/models", params={"url": "noop.mar"}).status_code == 200
    return app


def test_customized_describe_asks_a_worker_through_the_queue(
    redis_client: fakeredis.FakeRedis, settings: Settings
) -> None:
    dispatcher = Describing(Reply(200, b'{"handler": "noop", "batch": 1}'))
    app = customized_app(redis_client, settings, dispatcher)
    [doc] = app.simulate_get("/models/noop", params={"customized": "true"}).json
    assert doc["customizedMetadata"] == {"handler": "noop", "batch": 1}
    assert dispatcher.sent == [("noop", "1.0", (), {"describe": "True"}, {"kind": "describe"})]
    # Not for /all, as in TorchServe.
    assert (
        "customizedMetadata"
        not in app.simulate_get("/models/noop/all", params={"customized": "true"}).json[0]
    )


@pytest.mark.parametrize(
    ("reply", "code", "message"),
    [
        (
            NoWorker("no worker"),
            503,
            'Model "noop" has no worker to serve describe request. '
            "Please use scale workers API to add workers.",
        ),
        (Reply(500, b"", error="boom"), 500, "Failed to get customized model matadata."),
    ],
    ids=["no-worker", "handler-failed"],
)
def test_customized_describe_failures(
    redis_client: fakeredis.FakeRedis,
    settings: Settings,
    reply: Reply | Exception,
    code: int,
    message: str,
) -> None:
    app = customized_app(redis_client, settings, Describing(reply))
    result = app.simulate_get("/models/noop", params={"customized": "true"})
    assert result.status_code == code
    assert result.json["message"] == message
