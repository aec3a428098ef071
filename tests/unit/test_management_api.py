"""Management API rows of docs/torchserve-compat.md#management-api: status, body and headers."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from falcon import testing
from openapi_spec_validator import validate

from control.core import keys, observed
from control.core.observed import WorkerRecord, WorkerState
from control.core.settings import Settings
from tests.support.archives import build_mar
from tests.support.fakes import FakeFleet
from tests.support.processes import wait_for

NOT_FOUND_RESOURCE = "Requested resource is not found, please refer to API document."
NOT_ALLOWED = "Requested method is not allowed, please refer to API document."


def error_body(code: int, type_: str, message: str) -> bytes:
    return (
        f'{{\n  "code": {code},\n  "type": "{type_}",\n  "message": {json.dumps(message)}\n}}\n'
    ).encode()


def assert_error(result: testing.Result, code: int, type_: str, message: str) -> None:
    assert result.status_code == code, result.text
    assert result.content == error_body(code, type_, message)
    assert result.headers["content-type"] == "application/json"
    assert result.headers["connection"] == "close"
    assert_common_headers(result)


def assert_common_headers(result: testing.Result) -> None:
    uuid.UUID(result.headers["x-request-id"])
    assert result.headers["pragma"] == "no-cache"
    assert result.headers["cache-control"] == "no-cache; no-store, must-revalidate, private"
    assert result.headers["expires"] == "Thu, 01 Jan 1970 00:00:00 UTC"


def assert_status(result: testing.Result, code: int, message: str) -> None:
    assert result.status_code == code, result.text
    assert result.content == (json.dumps({"status": message}, indent=2) + "\n").encode()
    assert result.headers["connection"] == "keep-alive"
    assert_common_headers(result)


def registry_snapshot(client: testing.TestClient) -> Any:
    models = client.simulate_get("/models").json["models"]
    return [(m, client.simulate_get(f"/models/{m['modelName']}/all").json) for m in models]


# -- register ---------------------------------------------------------------------------


def test_register_zero_workers(client: testing.TestClient) -> None:
    result = client.simulate_post("/models", params={"url": "noop.mar"})
    assert_status(
        result,
        200,
        'Model "noop" Version: 1.0 registered with 0 initial workers. '
        "Use scale workers API to add workers for the model.",
    )
    assert client.simulate_get("/models").json == {
        "models": [{"modelName": "noop", "modelUrl": "noop.mar"}]
    }


@pytest.mark.parametrize(
    ("query", "code", "type_", "message"),
    [
        ("", 400, "BadRequestException", "Parameter url is required."),
        ("url=", 404, "ModelNotFoundException", "empty url"),
        (
            "url=noop.mar&runtime=python4",
            400,
            "BadRequestException",
            "Invalid RuntimeType value: python4",
        ),
        (
            "url=../noop.mar",
            404,
            "ModelNotFoundException",
            "Relative path is not allowed in url: ../noop.mar",
        ),
        (
            "url=https://example.com/m.mar",
            404,
            "ModelNotFoundException",
            "Given URL https://example.com/m.mar does not match any allowed URL(s)",
        ),
        ("url=missing.mar", 404, "ModelNotFoundException", "Model not found at: missing.mar"),
        (
            "url=noop.mar&model_name=9bad",
            400,
            "InvalidModelException",
            "Invalid model name: 9bad. A model name must start with a letter and contain only "
            "letters, digits, '_', '-' and '.'",
        ),
    ],
)
def test_register_errors_leave_registry_unchanged(
    client: testing.TestClient, query: str, code: int, type_: str, message: str
) -> None:
    client.simulate_post("/models", params={"url": "other.mar"})
    before = registry_snapshot(client)
    assert_error(client.simulate_post("/models", query_string=query), code, type_, message)
    assert registry_snapshot(client) == before


def test_register_duplicate_is_409(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    before = registry_snapshot(client)
    assert_error(
        client.simulate_post("/models", params={"url": "noop.mar"}),
        409,
        "ConflictStatusException",
        "Model version 1.0 is already registered for model noop",
    )
    assert registry_snapshot(client) == before


def test_register_second_version_keeps_default(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert client.simulate_post("/models", params={"url": "noop_v2.mar"}).status_code == 200
    described = client.simulate_get("/models/noop").json
    assert [d["modelVersion"] for d in described] == ["1.0"]
    every = client.simulate_get("/models/noop/all").json
    assert sorted(d["modelVersion"] for d in every) == ["1.0", "2.0"]


def test_register_model_name_override(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar", "model_name": "renamed"})
    assert client.simulate_get("/models/renamed").json[0]["modelName"] == "renamed"


def test_register_without_name_anywhere(client: testing.TestClient, store_dir: Path) -> None:
    build_mar(store_dir / "anon.mar", None)
    assert_error(
        client.simulate_post("/models", params={"url": "anon.mar"}),
        400,
        "InvalidModelException",
        "Model name is not defined.",
    )


def test_register_lenient_numbers_and_booleans(client: testing.TestClient) -> None:
    result = client.simulate_post(
        "/models",
        query_string=(
            "url=noop.mar&batch_size=dd&max_batch_delay=junk&initial_workers=-1&synchronous=-1"
            "&response_timeout=x&startup_timeout=nan"
        ),
    )
    assert result.status_code == 200
    doc = client.simulate_get("/models/noop").json[0]
    assert (doc["batchSize"], doc["maxBatchDelay"], doc["minWorkers"]) == (1, 100, 0)
    assert (doc["responseTimeout"], doc["startupTimeout"]) == (120, 120)


def test_register_first_repeated_parameter_wins(client: testing.TestClient) -> None:
    client.simulate_post("/models", query_string="url=noop.mar&batch_size=4&batch_size=8")
    assert client.simulate_get("/models/noop").json[0]["batchSize"] == 4


def test_register_json_body_ignores_query(client: testing.TestClient) -> None:
    result = client.simulate_post(
        "/models",
        query_string="url=other.mar",
        body=json.dumps({"url": "noop.mar", "batch_size": "3", "initial_workers": 0}),
        headers={"Content-Type": "application/json"},
    )
    assert result.status_code == 200
    assert client.simulate_get("/models").json["models"][0]["modelName"] == "noop"
    assert client.simulate_get("/models/noop").json[0]["batchSize"] == 3


def test_register_bad_json_body(client: testing.TestClient) -> None:
    result = client.simulate_post(
        "/models", body="{nope", headers={"Content-Type": "application/json"}
    )
    assert result.status_code == 400
    assert result.json["type"] == "BadRequestException"
    assert client.simulate_get("/models").json == {"models": []}


def test_register_async_with_workers(client: testing.TestClient) -> None:
    result = client.simulate_post(
        "/models", params={"url": "noop.mar", "initial_workers": "2", "synchronous": "false"}
    )
    assert_status(result, 202, "Processing worker updates...")
    doc = client.simulate_get("/models/noop").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == (2, 2)


def test_register_sync_waits_for_ready_workers(
    client: testing.TestClient, fleet: FakeFleet
) -> None:
    result = client.simulate_post("/models", params={"url": "noop.mar", "initial_workers": "2"})
    assert_status(result, 200, 'Model "noop" Version: 1.0 registered with 2 initial workers')
    workers = client.simulate_get("/models/noop").json[0]["workers"]
    assert [w["status"] for w in workers] == ["READY", "READY"]


def test_register_sync_failure_rolls_back(
    client: testing.TestClient, fleet: FakeFleet, caplog: pytest.LogCaptureFixture
) -> None:
    result = client.simulate_post(
        "/models", params={"url": "noop.mar", "initial_workers": "1", "handler": "invalidHandler"}
    )
    assert_error(
        result,
        500,
        "InternalServerException",
        "Failed to start workers for model noop version: 1.0",
    )
    assert client.simulate_get("/models").json == {"models": []}
    # The worker's real load error (the archive has no such module), as the API logs it.
    assert (
        "rolling back noop:1.0, workers failed: "
        "ModuleNotFoundError: No module named 'invalidHandler'" in caplog.text
    )


OOM_HANDLER = """\
def handle(data, context):
    raise MemoryError("model too large")
"""


def test_register_sync_out_of_memory_is_507(
    client: testing.TestClient,
    fleet: FakeFleet,
    store_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    build_mar(
        store_dir / "oom.mar",
        "noop",
        handler="oom_handler.py",
        extra={"oom_handler.py": OOM_HANDLER.encode()},
    )
    result = client.simulate_post("/models", params={"url": "oom.mar", "initial_workers": "1"})
    assert_error(
        result,
        507,
        "InternalServerException",
        "Failed to start workers for model noop version: 1.0",
    )
    assert (
        "workers failed: System out of memory: MemoryError: model too large "
        "(oom_handler.py, line 2)" in caplog.text
    )


def test_register_sync_times_out_without_workers(make_client: Any, settings: Settings) -> None:
    client = make_client(settings.replace(worker_spawn_timeout=0))
    result = client.simulate_post(
        "/models", params={"url": "noop.mar", "initial_workers": "1", "startup_timeout": "0"}
    )
    assert_error(
        result,
        500,
        "InternalServerException",
        "Failed to start workers for model noop version: 1.0",
    )
    assert client.simulate_get("/models").json == {"models": []}


def test_model_config_yaml_precedence(client: testing.TestClient, store_dir: Path) -> None:
    build_mar(
        store_dir / "cfg.mar",
        "cfg",
        config_yaml=(
            "minWorkers: 2\nmaxWorkers: 3\nbatchSize: 4\nmaxBatchDelay: 50\n"
            "responseTimeout: 30\ndeviceIds: [0, 1]\nhandler:\n  threshold: 0.5\n"
        ),
    )
    result = client.simulate_post(
        "/models",
        params={
            "url": "cfg.mar",
            "initial_workers": "1",
            "response_timeout": "99",
            "batch_size": "8",
            "synchronous": "false",
        },
    )
    assert result.status_code == 202
    doc = client.simulate_get("/models/cfg").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == (2, 3)
    assert doc["batchSize"] == 8  # REST wins for batching
    assert doc["maxBatchDelay"] == 50  # yaml when REST is absent
    assert doc["responseTimeout"] == 30  # yaml wins, REST ignored
    assert doc["startupTimeout"] == 120  # yaml present: its default, not REST's
    assert doc["deviceIds"] == [0, 1]


def test_model_api_disabled(make_client: Any, settings: Settings) -> None:
    client = make_client(settings.replace(enable_model_api=False))
    assert_error(
        client.simulate_post("/models", params={"url": "noop.mar"}),
        405,
        "MethodNotAllowedException",
        NOT_ALLOWED,
    )
    assert_error(
        client.simulate_delete("/models/noop"), 405, "MethodNotAllowedException", NOT_ALLOWED
    )
    assert client.simulate_get("/models").status_code == 200


# -- list -------------------------------------------------------------------------------


@pytest.fixture
def three(client: testing.TestClient, store_dir: Path) -> testing.TestClient:
    build_mar(store_dir / "zeta.mar", "zeta")
    for url in ("zeta.mar", "noop.mar", "other.mar"):
        assert client.simulate_post("/models", params={"url": url}).status_code == 200
    client.simulate_post("/models", params={"url": "noop_v2.mar"})
    return client


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {"models": ["noop", "other", "zeta"]}),
        ("limit=&next_page_token=", {"models": ["noop", "other", "zeta"]}),
        ("limit=1", {"nextPageToken": "1", "models": ["noop"]}),
        ("limit=-1", {"models": ["noop", "other", "zeta"]}),
        ("limit=101", {"models": ["noop", "other", "zeta"]}),
        ("limit=1&next_page_token=1", {"nextPageToken": "2", "models": ["other"]}),
        ("limit=1&next_page_token=-1", {"nextPageToken": "1", "models": ["noop"]}),
        ("limit=2&next_page_token=1", {"nextPageToken": "3", "models": ["other", "zeta"]}),
        ("next_page_token=12", {"models": []}),
        ("limit=0", {"nextPageToken": "0", "models": []}),
        ("limit=abc&next_page_token=xyz", {"models": ["noop", "other", "zeta"]}),
    ],
)
def test_list_pagination(three: testing.TestClient, query: str, expected: dict[str, Any]) -> None:
    result = three.simulate_get("/models", query_string=query)
    assert result.status_code == 200
    body = result.json
    assert list(body) == list(expected)  # nextPageToken comes first, as Gson writes it
    assert body.get("nextPageToken") == expected.get("nextPageToken")
    assert [m["modelName"] for m in body["models"]] == expected["models"]


def test_list_shows_default_version_url(three: testing.TestClient) -> None:
    three.simulate_put("/models/noop/2.0/set-default")
    models = {m["modelName"]: m["modelUrl"] for m in three.simulate_get("/models").json["models"]}
    assert models["noop"] == "noop_v2.mar"


def test_list_empty_is_exact(client: testing.TestClient) -> None:
    result = client.simulate_get("/models")
    assert result.content == b'{\n  "models": []\n}\n'
    assert_common_headers(result)
    assert result.headers["connection"] == "keep-alive"


# -- describe ---------------------------------------------------------------------------


def test_describe_exact_document(client: testing.TestClient, redis_client: Any) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    observed.publish(
        redis_client,
        WorkerRecord(
            wid="9000",
            model="noop",
            version="1.0",
            host="h",
            pid=77,
            gpu=-1,
            state=WorkerState.READY,
            started_at=1700000000.123,
            memory=2048,
        ),
        ttl=60,
    )
    observed.publish(
        redis_client,
        WorkerRecord(
            wid="9001",
            model="noop",
            version="1.0",
            host="h",
            pid=78,
            gpu=0,
            state=WorkerState.LOADING,
            started_at=1700000001.5,
        ),
        ttl=60,
    )
    # jobQueueStatus counts the online queue (job_queue_size), never batch-job messages.
    redis_client.rpush(keys.online_queue("noop", "1.0"), "a", "b")
    redis_client.rpush(keys.batch_queue("noop", "1.0"), "c", "d", "e")
    result = client.simulate_get("/models/noop")
    expected = [
        {
            "modelName": "noop",
            "modelVersion": "1.0",
            "modelUrl": "noop.mar",
            "runtime": "python",
            "minWorkers": 0,
            "maxWorkers": 0,
            "batchSize": 1,
            "maxBatchDelay": 100,
            "responseTimeout": 120,
            "startupTimeout": 120,
            "maxRetryTimeoutInSec": 300,
            "clientTimeoutInMills": 0,
            "parallelType": "",
            "parallelLevel": 0,
            "deviceType": "cpu",
            "continuousBatching": False,
            "useJobTicket": False,
            "useVenv": False,
            "stateful": False,
            "sequenceMaxIdleMSec": 0,
            "sequenceTimeoutMSec": 0,
            "maxNumSequence": 0,
            "maxSequenceJobQueueSize": 0,
            "loadedAtStartup": False,
            "workers": [
                {
                    "id": "9000",
                    "startTime": "2023-11-14T22:13:20.123Z",
                    "status": "READY",
                    "memoryUsage": 2048,
                    "pid": 77,
                    "gpu": False,
                    "gpuUsage": "N/A",
                },
                {
                    "id": "9001",
                    "startTime": "2023-11-14T22:13:21.500Z",
                    "status": "UNLOADING",
                    "memoryUsage": 0,
                    "pid": 78,
                    "gpu": True,
                    # No supervisor sampled nvidia-smi: TorchServe's text for that.
                    "gpuUsage": "failed to obtained gpu usage",
                },
            ],
            "jobQueueStatus": {"remainingCapacity": 98, "pendingRequests": 2},
        }
    ]
    assert result.status_code == 200
    assert result.content == (json.dumps(expected, indent=2) + "\n").encode()
    assert result.headers["content-type"] == "application/json"


def test_describe_expired_worker_is_gone(client: testing.TestClient, redis_client: Any) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    record = WorkerRecord(
        wid="9000",
        model="noop",
        version="1.0",
        host="h",
        pid=1,
        gpu=-1,
        state=WorkerState.READY,
        started_at=1.0,
    )
    observed.publish(redis_client, record, ttl=60)
    redis_client.delete(keys.worker("9000"))  # what the TTL does when a worker dies
    assert client.simulate_get("/models/noop").json[0]["workers"] == []
    assert redis_client.smembers(keys.workers("noop", "1.0")) == set()


@pytest.mark.parametrize(
    ("path", "code", "type_", "message"),
    [
        ("/models/nope", 404, "ModelNotFoundException", "Model not found: nope"),
        (
            "/models/noop/0.0",
            404,
            "ModelVersionNotFoundException",
            "Model version: 0.0 does not exist for model: noop",
        ),
        ("/models/nope/all", 404, "ModelNotFoundException", "Model not found: nope"),
    ],
)
def test_describe_errors(
    client: testing.TestClient, path: str, code: int, type_: str, message: str
) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert_error(client.simulate_get(path), code, type_, message)


def test_describe_paths(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    client.simulate_post("/models", params={"url": "noop_v2.mar"})
    assert client.simulate_get("/models/noop/").json[0]["modelVersion"] == "1.0"
    assert client.simulate_get("/models/noop/2.0").json[0]["modelVersion"] == "2.0"
    # TorchServe quirk: a 5-segment set-default path describes the default version.
    assert client.simulate_get("/models/noop/2.0/set-default").json[0]["modelVersion"] == "1.0"


def test_describe_customized_needs_a_worker(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert_error(
        client.simulate_get("/models/noop", params={"customized": "true"}),
        503,
        "ServiceUnavailableException",
        'Model "noop" has no worker to serve describe request. '
        "Please use scale workers API to add workers.",
    )
    assert client.simulate_get("/models/noop", params={"customized": "yes"}).status_code == 200


# -- scale ------------------------------------------------------------------------------


def test_scale_without_parameters_means_one_worker(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert_status(client.simulate_put("/models/noop"), 202, "Processing worker updates...")
    doc = client.simulate_get("/models/noop").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == (1, 1)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("min_worker=3", (3, 3)),
        ("min_worker=2&max_worker=4", (2, 4)),
        ("min_worker=nan&synchronous=nan", (1, 1)),
        ("max_worker=5", (1, 5)),
        ("number_gpu=10&timeout=-1", (1, 1)),
        ("min_worker=0", (0, 0)),
    ],
)
def test_scale_parameters(
    client: testing.TestClient, query: str, expected: tuple[int, int]
) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert client.simulate_put("/models/noop", query_string=query).status_code == 202
    doc = client.simulate_get("/models/noop").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == expected


@pytest.mark.parametrize(
    ("path", "query", "code", "type_", "message"),
    [
        (
            "/models/nope",
            "min_worker=2&max_worker=1",
            400,
            "BadRequestException",
            "max_worker cannot be less than min_worker.",
        ),
        (
            "/models/noop",
            "max_worker=-1",
            400,
            "BadRequestException",
            "max_worker cannot be less than min_worker.",
        ),
        (
            "/models/noop",
            "min_worker=-1",
            400,
            "BadRequestException",
            "min_worker cannot be negative.",
        ),
        ("/models/nope", "min_worker=1", 404, "ModelNotFoundException", "Model not found: nope"),
        (
            "/models/noop/0.0",
            "min_worker=1",
            404,
            "ModelVersionNotFoundException",
            "Model version: 0.0 does not exist for model: noop",
        ),
        (
            "/models/noop",
            "model_version=0.0",
            404,
            "ModelVersionNotFoundException",
            "Model version: 0.0 does not exist for model: noop",
        ),
    ],
)
def test_scale_errors(
    client: testing.TestClient, path: str, query: str, code: int, type_: str, message: str
) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    before = registry_snapshot(client)
    assert_error(client.simulate_put(path, query_string=query), code, type_, message)
    assert registry_snapshot(client) == before


def test_scale_version_from_query(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    client.simulate_post("/models", params={"url": "noop_v2.mar"})
    client.simulate_put("/models/noop", params={"min_worker": "2", "model_version": "2.0"})
    assert client.simulate_get("/models/noop/2.0").json[0]["minWorkers"] == 2
    assert client.simulate_get("/models/noop/1.0").json[0]["minWorkers"] == 0


def test_scale_sync(client: testing.TestClient, fleet: FakeFleet) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert_status(
        client.simulate_put("/models/noop", params={"min_worker": "3", "synchronous": "true"}),
        200,
        "Workers scaled to 3 for model: noop",
    )
    assert len(client.simulate_get("/models/noop").json[0]["workers"]) == 3
    assert_status(
        client.simulate_put("/models/noop/1.0", params={"min_worker": "1", "synchronous": "true"}),
        200,
        "Workers scaled to 1 for model: noop, version: 1.0",
    )
    assert len(client.simulate_get("/models/noop").json[0]["workers"]) == 1


def test_scale_sync_failure_keeps_model(client: testing.TestClient, fleet: FakeFleet) -> None:
    client.simulate_post("/models", params={"url": "noop.mar", "handler": "invalidHandler"})
    assert_error(
        client.simulate_put("/models/noop", params={"min_worker": "1", "synchronous": "true"}),
        500,
        "InternalServerException",
        "Failed to start workers for model noop version: null",
    )
    # Describe shows the loader's own text (polled: the supervisor retries the slot after
    # its back-off, and the retry is briefly STARTING without one).
    error = "ModuleNotFoundError: No module named 'invalidHandler'"
    failed = {"status": "UNLOADING", "error": error}

    def shown() -> list[dict[str, str]]:
        workers = client.simulate_get("/models/noop").json[0]["workers"]
        return [{"status": w["status"], "error": w.get("lastError", "")} for w in workers]

    wait_for(lambda: shown() == [failed], 5, "the load error in describe")


def test_scale_sync_drain_timeout(make_client: Any, settings: Settings, fleet: FakeFleet) -> None:
    client = make_client(settings.replace(unregister_model_timeout=0))
    client.simulate_post("/models", params={"url": "noop.mar", "initial_workers": "1"})
    fleet.stuck.add(("noop", "1.0"))
    assert_error(
        client.simulate_put("/models/noop", params={"min_worker": "0", "synchronous": "true"}),
        408,
        "RequestTimeoutException",
        "Timed out while cleaning resources: noop",
    )


# -- set-default ------------------------------------------------------------------------


def test_set_default(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    client.simulate_post("/models", params={"url": "noop_v2.mar"})
    assert_status(
        client.simulate_put("/models/noop/2.0/set-default"),
        200,
        'Default version successfully updated for model "noop" to "2.0"',
    )
    assert client.simulate_get("/models/noop").json[0]["modelVersion"] == "2.0"


@pytest.mark.parametrize(
    ("path", "code", "type_", "message"),
    [
        (
            "/models/noop/0.0/set-default",
            404,
            "ModelVersionNotFoundException",
            "Model version 0.0 does not exist for model noop",
        ),
        ("/models/nope/1.0/set-default", 404, "ModelNotFoundException", "Model not found: nope"),
    ],
)
def test_set_default_errors(
    client: testing.TestClient, path: str, code: int, type_: str, message: str
) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert_error(client.simulate_put(path), code, type_, message)


# -- unregister -------------------------------------------------------------------------


def test_unregister(client: testing.TestClient, store_dir: Path) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    result = client.simulate_delete("/models/noop/", query_string="synchronous=nan&timeout=true")
    assert_status(result, 200, 'Model "noop" unregistered')
    assert client.simulate_get("/models").json == {"models": []}
    assert (store_dir / "noop.mar").exists()  # local archives stay in the store


def test_unregister_default_with_other_versions_is_403(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    client.simulate_post("/models", params={"url": "noop_v2.mar"})
    before = registry_snapshot(client)
    assert_error(
        client.simulate_delete("/models/noop"),
        403,
        "InvalidModelVersionException",
        "Cannot remove default version for model noop",
    )
    assert registry_snapshot(client) == before
    assert client.simulate_delete("/models/noop/2.0").status_code == 200
    assert client.simulate_delete("/models/noop/1.0").status_code == 200
    assert_error(
        client.simulate_get("/models/noop"), 404, "ModelNotFoundException", "Model not found: noop"
    )


@pytest.mark.parametrize(
    ("path", "type_", "message"),
    [
        ("/models/nope", "ModelNotFoundException", "Model not found: nope"),
        (
            "/models/noop/0.0",
            "ModelVersionNotFoundException",
            "Model version: 0.0 does not exist for model: noop",
        ),
    ],
)
def test_unregister_errors(client: testing.TestClient, path: str, type_: str, message: str) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    assert_error(client.simulate_delete(path), 404, type_, message)


def test_unregister_drains_workers(
    client: testing.TestClient, fleet: FakeFleet, redis_client: Any
) -> None:
    client.simulate_post("/models", params={"url": "noop.mar", "initial_workers": "2"})
    assert len(observed.workers_of(redis_client, "noop", "1.0")) == 2
    assert client.simulate_delete("/models/noop").status_code == 200
    # Answered once no worker takes requests (they drain); the supervisor then reaps them.
    assert observed.serving_count(observed.workers_of(redis_client, "noop", "1.0")) == 0
    wait_for(
        lambda: observed.workers_of(redis_client, "noop", "1.0") == [], 5, "the workers reaped"
    )


def test_unregister_timeout_keeps_model(
    make_client: Any, settings: Settings, fleet: FakeFleet
) -> None:
    client = make_client(settings.replace(unregister_model_timeout=0))
    client.simulate_post("/models", params={"url": "noop.mar", "initial_workers": "1"})
    fleet.stuck.add(("noop", "1.0"))
    assert_error(
        client.simulate_delete("/models/noop"),
        408,
        "RequestTimeoutException",
        "Timed out while cleaning resources: noop",
    )
    doc = client.simulate_get("/models/noop").json[0]
    assert (doc["minWorkers"], doc["maxWorkers"]) == (0, 0)


def test_unregister_deletes_downloaded_archive(
    make_client: Any, settings: Settings, store_dir: Path
) -> None:
    source = store_dir.parent / "remote.mar"
    build_mar(source, "remote")

    def fetch(url: str, target: Path, limit: int) -> None:
        target.write_bytes(source.read_bytes())

    client = make_client(
        settings.replace(allowed_urls=(r"https://models\.example/.*",)), fetch=fetch
    )
    url = "https://models.example/files/remote.mar"
    assert client.simulate_post("/models", params={"url": url}).status_code == 200
    assert (store_dir / "remote.mar").exists()
    assert client.simulate_get("/models/remote").json[0]["modelUrl"] == url
    assert_error(
        client.simulate_post("/models", params={"url": url}),
        500,
        "InternalServerException",
        "Model file already exists remote.mar",
    )
    assert client.simulate_delete("/models/remote").status_code == 200
    assert not (store_dir / "remote.mar").exists()


def test_download_failure_is_400(make_client: Any, settings: Settings, store_dir: Path) -> None:
    def fetch(url: str, target: Path, limit: int) -> None:
        raise OSError("404 from server")

    client = make_client(
        settings.replace(allowed_urls=(r"https://models\.example/.*",)), fetch=fetch
    )
    url = "https://models.example/invalid.mar"
    assert_error(
        client.simulate_post("/models", params={"url": url}),
        400,
        "DownloadArchiveException",
        f"Failed to download archive from: {url}",
    )
    assert not (store_dir / "invalid.mar").exists()


# -- routing, descriptions, limits --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/", 405),
        ("POST", "/models/noop", 405),
        ("PATCH", "/models", 405),
        ("PATCH", "/models/noop", 405),
        ("GET", "/models/a/b/c", 404),
        ("GET", "/unknown", 404),
        ("GET", "/ping", 404),
        ("POST", "/v1/models/noop", 405),
        ("PUT", "/workflows", 405),
    ],
)
def test_routing_errors(client: testing.TestClient, method: str, path: str, code: int) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    result = client.simulate_request(method, path)
    if code == 404:
        assert_error(result, 404, "ResourceNotFoundException", NOT_FOUND_RESOURCE)
    else:
        assert_error(result, 405, "MethodNotAllowedException", NOT_ALLOWED)


def test_api_description(client: testing.TestClient) -> None:
    for result in (
        client.simulate_options("/"),
        client.simulate_get("/api-description"),
        client.simulate_post("/api-description"),
    ):
        assert result.status_code == 200
        assert result.json["openapi"].startswith("3.")
        assert "/models" in result.json["paths"]
        assert_common_headers(result)


def test_model_description(client: testing.TestClient) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    doc = client.simulate_options("/models/noop").json
    assert doc["paths"] and all(p.startswith("/models/noop") for p in doc["paths"])
    validate(doc)  # the per-model description is valid OpenAPI on its own
    assert_error(
        client.simulate_options("/models/nope"),
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    )
    assert_error(
        client.simulate_options("/models/noop/9.9"),
        404,
        "ModelNotFoundException",
        "Model not found: noop",
    )


def test_kserve_readiness(client: testing.TestClient, fleet: FakeFleet) -> None:
    client.simulate_post("/models", params={"url": "noop.mar"})
    result = client.simulate_get("/v1/models/noop")
    assert result.content == b'{\n  "name": "noop",\n  "ready": false\n}\n'
    client.simulate_put("/models/noop", params={"min_worker": "1", "synchronous": "true"})
    assert client.simulate_get("/v1/models/noop").json == {"name": "noop", "ready": True}
    assert_error(
        client.simulate_get("/v1/models/nope"),
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    )


def test_workflows(client: testing.TestClient) -> None:
    assert client.simulate_get("/workflows").content == b'{\n  "workflows": []\n}\n'
    assert_error(
        client.simulate_post("/workflows", params={"url": "x.war"}),
        400,
        "BadRequestException",
        "Registering new workflows is disabled.",
    )
    assert_error(
        client.simulate_get("/workflows/wf"),
        404,
        "WorkflowNotFoundException",
        "Workflow not found: wf",
    )
    assert_error(
        client.simulate_delete("/workflows/wf"),
        404,
        "WorkflowNotFoundException",
        "Workflow not found: wf",
    )


def test_request_too_large_is_bare_413(make_client: Any, settings: Settings) -> None:
    client = make_client(settings.replace(max_request_size=100))
    result = client.simulate_post(
        "/models", body=json.dumps({"url": "x" * 200}), headers={"Content-Type": "application/json"}
    )
    assert result.status_code == 413
    assert result.content == b""
    assert client.simulate_get("/models").json == {"models": []}


def test_unexpected_error_is_generic_500(client: testing.TestClient, redis_client: Any) -> None:
    redis_client.set(keys.model("broken"), "not a hash")
    redis_client.zadd(keys.MODELS, {"broken": 0})
    result = client.simulate_get("/models/broken")
    assert result.status_code == 500
    assert result.json == {
        "code": 500,
        "type": "InternalServerException",
        "message": "Internal Server Error",
    }
    assert not re.search(r"Traceback|/work/|\.py", result.text)
